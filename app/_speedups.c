// The two per-event steps of the hot path that pure Python could not bring under budget
// (issue 8): finishing decoded records (validity check, the syn event a record carries) and
// writing each event's JSON (~0.9 us per event as a Python f-string).
//
// Optional: setup.py builds it where a C compiler and Python headers exist. Without it,
// app/decode.py and app/models.py do the same in Python; those are the reference, and
// tests/test_speedups.py checks that both give identical results. Nothing about the record
// layout is written here: configure() receives the field positions and name tables from
// app/bpf/event.py.

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

enum { F_TS, F_START, F_CONN, F_SENT, F_RECEIVED, F_RETRANS, F_PID, F_NETNS, F_SADDR, F_DADDR, F_SPORT, F_DPORT,
       F_FAMILY, F_TYPE, F_ROLE, F_STATE, F_OLDSTATE, F_FLAGS, F_COMM, N_FIELDS };

static Py_ssize_t pos[N_FIELDS];   // position of each field in an event record tuple
static Py_ssize_t rec_len;         // fields in a record
static PyObject *type_names;       // tuple: number -> str or None (event types)
static PyObject *state_names;      // tuple: number -> str or None (TCP states)
static PyObject *role_names;       // tuple: number -> str
static PyObject *family_names;     // tuple: number -> str or None (4, 6)
static PyObject *syn_type_by_role;  // tuple of int objects, by role
static PyObject *syn_state_by_role;
static long flag_syn, close_type;

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *positions, *tn, *sn, *rn, *fn, *syt, *sys;
    if (!PyArg_ParseTuple(args, "O!nO!O!O!O!O!O!ll", &PyTuple_Type, &positions, &rec_len, &PyTuple_Type, &tn,
                          &PyTuple_Type, &sn, &PyTuple_Type, &rn, &PyTuple_Type, &fn, &PyTuple_Type, &syt,
                          &PyTuple_Type, &sys, &flag_syn, &close_type))
        return NULL;
    if (PyTuple_GET_SIZE(positions) != N_FIELDS) {
        PyErr_Format(PyExc_ValueError, "expected %d field positions", N_FIELDS);
        return NULL;
    }
    for (int i = 0; i < N_FIELDS; i++) {
        pos[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(positions, i));
        if (pos[i] < 0 || pos[i] >= rec_len) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "field position out of range");
            return NULL;
        }
    }
    PyObject *tables[] = {tn, sn, rn, fn, syt, sys};
    PyObject **slots[] = {&type_names, &state_names, &role_names, &family_names, &syn_type_by_role,
                          &syn_state_by_role};
    for (int i = 0; i < 6; i++) {
        Py_INCREF(tables[i]);
        Py_XSETREF(*slots[i], tables[i]);
    }
    Py_RETURN_NONE;
}

static int configured(void) {
    if (!type_names) {
        PyErr_SetString(PyExc_RuntimeError, "_speedups.configure() was not called");
        return 0;
    }
    return 1;
}

// names[n] if it is a str, else NULL (no exception: "not a known number").
static PyObject *lookup_name(PyObject *names, PyObject *num) {
    Py_ssize_t n = PyLong_AsSsize_t(num);
    if (n == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return NULL;
    }
    if (n < 0 || n >= PyTuple_GET_SIZE(names))
        return NULL;
    PyObject *s = PyTuple_GET_ITEM(names, n);
    return PyUnicode_Check(s) ? s : NULL;
}

#define FIELD(rec, f) PyTuple_GET_ITEM((rec), pos[f])

// Addresses, ports, owners, namespaces and process names repeat across records: each record
// sharing one object per distinct value instead of holding its own saves ~300 bytes per held
// event, and the freeing of cold objects when the replay buffer and the closed-connection
// history let old records go (profiled: ~10% of serve). Bounded; cleared when full.
static PyObject *interned;
#define MAX_INTERNED 65536

static int intern_fields(PyObject *rec) {
    static const int fields[] = {F_SADDR, F_DADDR, F_COMM, F_PID, F_NETNS, F_SPORT, F_DPORT};
    if (Py_REFCNT(rec) != 1)
        return 0;   // only a tuple nobody else holds yet may have its items swapped
    if (!interned && !(interned = PyDict_New()))
        return -1;
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        PyObject *v = PyTuple_GET_ITEM(rec, pos[fields[i]]);
        PyObject *canon = PyDict_GetItemWithError(interned, v);   // borrowed
        if (canon) {
            if (canon != v) {
                Py_INCREF(canon);
                PyTuple_SET_ITEM(rec, pos[fields[i]], canon);
                Py_DECREF(v);
            }
        } else {
            if (PyErr_Occurred())
                return -1;
            if (PyDict_GET_SIZE(interned) >= MAX_INTERNED)
                PyDict_Clear(interned);
            if (PyDict_SetItem(interned, v, v))
                return -1;
        }
    }
    return 0;
}

// finish(unpacked, out) -> bad: appends to `out` every valid record of `unpacked` (an
// iterable of tuples, as struct.iter_unpack yields them), each FLAG_SYN record preceded by
// its syn event; returns how many were not valid.
static PyObject *finish(PyObject *self, PyObject *args) {
    PyObject *it_src, *out;
    if (!PyArg_ParseTuple(args, "OO!", &it_src, &PyList_Type, &out) || !configured())
        return NULL;
    PyObject *it = PyObject_GetIter(it_src);
    if (!it)
        return NULL;
    long bad = 0;
    PyObject *rec;
    while ((rec = PyIter_Next(it))) {
        if (!PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) != rec_len || !lookup_name(type_names, FIELD(rec, F_TYPE)) ||
            !lookup_name(state_names, FIELD(rec, F_STATE)) || !lookup_name(family_names, FIELD(rec, F_FAMILY)) ||
            !lookup_name(role_names, FIELD(rec, F_ROLE))) {
            bad++;
            Py_DECREF(rec);
            continue;
        }
        if (intern_fields(rec)) {
            Py_DECREF(rec);
            goto fail;
        }
        long flags = PyLong_AsLong(FIELD(rec, F_FLAGS));
        Py_ssize_t role = PyLong_AsSsize_t(FIELD(rec, F_ROLE));
        if (PyErr_Occurred() || role >= PyTuple_GET_SIZE(syn_type_by_role) ||
            role >= PyTuple_GET_SIZE(syn_state_by_role)) {
            PyErr_Clear();
            bad++;
            Py_DECREF(rec);
            continue;
        }
        if (flags & flag_syn) {
            PyObject *syn = PyTuple_New(rec_len);
            if (!syn) {
                Py_DECREF(rec);
                goto fail;
            }
            for (Py_ssize_t i = 0; i < rec_len; i++) {
                PyObject *v = PyTuple_GET_ITEM(rec, i);
                Py_INCREF(v);
                PyTuple_SET_ITEM(syn, i, v);
            }
            // At start_ns, no bytes yet, the syn type and state of its role, without FLAG_SYN.
            PyObject *zero = PyLong_FromLong(0);
            PyObject *fl = PyLong_FromLong(flags & ~flag_syn);
            if (!zero || !fl) {
                Py_XDECREF(zero);
                Py_XDECREF(fl);
                Py_DECREF(syn);
                Py_DECREF(rec);
                goto fail;
            }
            struct { int f; PyObject *v; } set[] = {
                {F_TS, FIELD(rec, F_START)}, {F_SENT, zero}, {F_RECEIVED, zero}, {F_RETRANS, zero},
                {F_TYPE, PyTuple_GET_ITEM(syn_type_by_role, role)}, {F_STATE, PyTuple_GET_ITEM(syn_state_by_role, role)},
                {F_OLDSTATE, zero}, {F_FLAGS, fl},
            };
            for (size_t i = 0; i < sizeof(set) / sizeof(set[0]); i++) {
                PyObject *old = PyTuple_GET_ITEM(syn, pos[set[i].f]);
                Py_INCREF(set[i].v);
                PyTuple_SET_ITEM(syn, pos[set[i].f], set[i].v);
                Py_DECREF(old);
            }
            Py_DECREF(zero);
            Py_DECREF(fl);
            int err = PyList_Append(out, syn);
            Py_DECREF(syn);
            if (err) {
                Py_DECREF(rec);
                goto fail;
            }
        }
        int err = PyList_Append(out, rec);
        Py_DECREF(rec);
        if (err)
            goto fail;
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(bad);
fail:
    Py_DECREF(it);
    return NULL;
}

// --- JSON ---------------------------------------------------------------------------

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} buf_t;

static int buf_grow(buf_t *b, Py_ssize_t need) {
    if (b->len + need <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + need)
        cap *= 2;
    char *p = PyMem_Realloc(b->p, cap);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_put(buf_t *b, const char *s, Py_ssize_t n) {
    if (buf_grow(b, n))
        return -1;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

// Decimal digits without printf (vsnprintf was most of the cost of an event's JSON).
static int buf_u64(buf_t *b, unsigned long long v) {
    char tmp[24];
    int i = sizeof(tmp);
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return buf_put(b, tmp + i, sizeof(tmp) - i);
}

static int buf_i64(buf_t *b, long long v) {
    if (v < 0) {
        if (buf_put(b, "-", 1))
            return -1;
        return buf_u64(b, 0ULL - (unsigned long long)v);
    }
    return buf_u64(b, (unsigned long long)v);
}

#define PUT_LIT(b, s) buf_put((b), (s), sizeof(s) - 1)

static int buf_str(buf_t *b, PyObject *ascii) {
    return buf_put(b, (const char *)PyUnicode_1BYTE_DATA(ascii), PyUnicode_GET_LENGTH(ascii));
}

// A str as json.dumps writes it (ensure_ascii): short escapes, \uXXXX (surrogate pairs) otherwise.
static int buf_json_str(buf_t *b, PyObject *s) {
    if (buf_put(b, "\"", 1))
        return -1;
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        char esc[16];
        int k;
        switch (c) {
        case '"': k = snprintf(esc, sizeof esc, "\\\""); break;
        case '\\': k = snprintf(esc, sizeof esc, "\\\\"); break;
        case '\n': k = snprintf(esc, sizeof esc, "\\n"); break;
        case '\r': k = snprintf(esc, sizeof esc, "\\r"); break;
        case '\t': k = snprintf(esc, sizeof esc, "\\t"); break;
        case '\b': k = snprintf(esc, sizeof esc, "\\b"); break;
        case '\f': k = snprintf(esc, sizeof esc, "\\f"); break;
        default:
            if (c >= 0x20 && c < 0x7f) {
                esc[0] = (char)c;
                k = 1;
            } else if (c < 0x10000) {
                k = snprintf(esc, sizeof esc, "\\u%04x", (unsigned)c);
            } else {
                Py_UCS4 v = c - 0x10000;
                k = snprintf(esc, sizeof esc, "\\u%04x\\u%04x", (unsigned)(0xd800 | (v >> 10)),
                             (unsigned)(0xdc00 | (v & 0x3ff)));
            }
        }
        if (buf_put(b, esc, k))
            return -1;
    }
    return buf_put(b, "\"", 1);
}

static int buf_addr(buf_t *b, PyObject *raw, long family) {
    char text[INET6_ADDRSTRLEN];
    if (!PyBytes_Check(raw) || PyBytes_GET_SIZE(raw) < 16) {
        PyErr_SetString(PyExc_ValueError, "address must be 16 bytes");
        return -1;
    }
    if (!inet_ntop(family == 4 ? AF_INET : AF_INET6, PyBytes_AS_STRING(raw), text, sizeof text)) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return buf_put(b, text, strlen(text));
}

// The JSON of the fields that do not change over a connection, ending with '}'.
static PyObject *steady_json(PyObject *rec) {
    buf_t b = {0};
    unsigned long long conn = PyLong_AsUnsignedLongLong(FIELD(rec, F_CONN));
    long family = PyLong_AsLong(FIELD(rec, F_FAMILY));
    unsigned long pid = PyLong_AsUnsignedLong(FIELD(rec, F_PID));
    unsigned long long netns = PyLong_AsUnsignedLongLong(FIELD(rec, F_NETNS));
    long sport = PyLong_AsLong(FIELD(rec, F_SPORT)), dport = PyLong_AsLong(FIELD(rec, F_DPORT));
    if (PyErr_Occurred())
        return NULL;
    PyObject *fam = lookup_name(family_names, FIELD(rec, F_FAMILY));
    PyObject *role = lookup_name(role_names, FIELD(rec, F_ROLE));
    if (!fam || !role || !PyUnicode_IS_ASCII(fam) || !PyUnicode_IS_ASCII(role)) {
        PyErr_SetString(PyExc_ValueError, "unknown family or role");
        return NULL;
    }
    PyObject *out = NULL;
    if (PUT_LIT(&b, "\"conn_id\":\"c") || buf_u64(&b, conn) || PUT_LIT(&b, "\",\"family\":\"") ||
        buf_str(&b, fam) || PUT_LIT(&b, "\",\"role\":\"") || buf_str(&b, role) || PUT_LIT(&b, "\",\"src_addr\":\"") ||
        buf_addr(&b, FIELD(rec, F_SADDR), family) || PUT_LIT(&b, "\",\"src_port\":") || buf_i64(&b, sport) ||
        PUT_LIT(&b, ",\"dst_addr\":\"") || buf_addr(&b, FIELD(rec, F_DADDR), family) ||
        PUT_LIT(&b, "\",\"dst_port\":") || buf_i64(&b, dport) || PUT_LIT(&b, ",\"pid\":"))
        goto done;
    if (pid) {
        PyObject *raw = FIELD(rec, F_COMM);
        if (!PyBytes_Check(raw)) {
            PyErr_SetString(PyExc_ValueError, "comm must be bytes");
            goto done;
        }
        const char *c = PyBytes_AS_STRING(raw);
        Py_ssize_t n = PyBytes_GET_SIZE(raw);
        const char *nul = memchr(c, 0, n);
        PyObject *comm = PyUnicode_DecodeUTF8(c, nul ? nul - c : n, "replace");
        if (!comm)
            goto done;
        int err = buf_u64(&b, pid) || PUT_LIT(&b, ",\"comm\":") || buf_json_str(&b, comm);
        Py_DECREF(comm);
        if (err)
            goto done;
    } else if (PUT_LIT(&b, "null,\"comm\":null")) {
        goto done;
    }
    if (PUT_LIT(&b, ",\"netns\":") || buf_u64(&b, netns) || PUT_LIT(&b, "}"))
        goto done;
    out = PyUnicode_DecodeASCII(b.p, b.len, "strict");
done:
    PyMem_Free(b.p);
    return out;
}

// "YYYY-MM-DDTHH:MM:SS" of a second since the epoch; consecutive events share a second.
static long long cached_sec = -1;
static char cached_prefix[40];
static int cached_len;

static int put_ts(buf_t *b, long long wall) {
    long long sec = wall / 1000000000LL, rem = wall % 1000000000LL;
    if (rem < 0) {   // floor division, as Python's //
        sec -= 1;
        rem += 1000000000LL;
    }
    if (sec != cached_sec) {
        time_t t = (time_t)sec;
        struct tm tm;
        if (!gmtime_r(&t, &tm)) {
            PyErr_SetString(PyExc_OverflowError, "timestamp out of range");
            return -1;
        }
        cached_len = snprintf(cached_prefix, sizeof(cached_prefix), "%04d-%02d-%02dT%02d:%02d:%02d",
                              tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
        cached_sec = sec;
    }
    if (buf_put(b, cached_prefix, cached_len))
        return -1;
    long us = (long)(rem / 1000);
    if (!us)
        return buf_put(b, "Z", 1);
    char frac[8] = {'.', 0, 0, 0, 0, 0, 0, 'Z'};
    for (int i = 6; i >= 1; i--, us /= 10)
        frac[i] = (char)('0' + us % 10);
    return buf_put(b, frac, 8);
}

// json_many(first_seq, recs, wall_offset_ns, steady) -> list[str]: the JSON of each event,
// numbered from first_seq. `steady` caches each connection's steady part:
// conn_id -> (pid, sport, text); bounded; a close event's entry is dropped after use.
static PyObject *json_many(PyObject *self, PyObject *args) {
    long long seq, offset;
    PyObject *recs, *steady;
    if (!PyArg_ParseTuple(args, "LO!LO!", &seq, &PyList_Type, &recs, &offset, &PyDict_Type, &steady) ||
        !configured())
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(recs);
    PyObject *out = PyList_New(n);
    if (!out)
        return NULL;
    buf_t b = {0};
    for (Py_ssize_t i = 0; i < n; i++, seq++) {
        PyObject *rec = PyList_GET_ITEM(recs, i);
        if (!PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) != rec_len) {
            PyErr_SetString(PyExc_TypeError, "not an event record");
            goto fail;
        }
        PyObject *conn = FIELD(rec, F_CONN);
        PyObject *hit = PyDict_GetItemWithError(steady, conn);   // borrowed
        if (!hit && PyErr_Occurred())
            goto fail;
        if (hit && (!PyTuple_Check(hit) || PyTuple_GET_SIZE(hit) != 3 ||
                    PyObject_RichCompareBool(PyTuple_GET_ITEM(hit, 0), FIELD(rec, F_PID), Py_EQ) != 1 ||
                    PyObject_RichCompareBool(PyTuple_GET_ITEM(hit, 1), FIELD(rec, F_SPORT), Py_EQ) != 1))
            hit = NULL;
        PyObject *text;
        if (hit) {
            text = PyTuple_GET_ITEM(hit, 2);
            Py_INCREF(text);
        } else {
            text = steady_json(rec);
            if (!text)
                goto fail;
            if (PyDict_GET_SIZE(steady) >= 65536)
                PyDict_Clear(steady);
            PyObject *entry = PyTuple_Pack(3, FIELD(rec, F_PID), FIELD(rec, F_SPORT), text);
            if (!entry || PyDict_SetItem(steady, conn, entry)) {
                Py_XDECREF(entry);
                Py_DECREF(text);
                goto fail;
            }
            Py_DECREF(entry);
        }
        PyObject *tname = lookup_name(type_names, FIELD(rec, F_TYPE));
        PyObject *sname = lookup_name(state_names, FIELD(rec, F_STATE));
        unsigned long long ts = PyLong_AsUnsignedLongLong(FIELD(rec, F_TS));
        unsigned long long sent = PyLong_AsUnsignedLongLong(FIELD(rec, F_SENT));
        unsigned long long received = PyLong_AsUnsignedLongLong(FIELD(rec, F_RECEIVED));
        unsigned long long retrans = PyLong_AsUnsignedLongLong(FIELD(rec, F_RETRANS));
        if (PyErr_Occurred() || !tname || !sname || !PyUnicode_IS_ASCII(text)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "unknown event type or state");
            Py_DECREF(text);
            goto fail;
        }
        b.len = 0;
        int err = PUT_LIT(&b, "{\"seq\":") || buf_i64(&b, seq) || PUT_LIT(&b, ",\"type\":\"") ||
                  buf_str(&b, tname) || PUT_LIT(&b, "\",\"ts\":\"") || put_ts(&b, (long long)ts + offset) ||
                  PUT_LIT(&b, "\",\"ts_ns\":") || buf_u64(&b, ts) || PUT_LIT(&b, ",\"state\":\"") ||
                  buf_str(&b, sname) || PUT_LIT(&b, "\",\"bytes_sent\":") || buf_u64(&b, sent) ||
                  PUT_LIT(&b, ",\"bytes_received\":") || buf_u64(&b, received) ||
                  PUT_LIT(&b, ",\"bytes_retrans\":") || buf_u64(&b, retrans) || PUT_LIT(&b, ",") ||
                  buf_str(&b, text);
        Py_DECREF(text);
        if (err)
            goto fail;
        if (PyLong_AsLong(FIELD(rec, F_TYPE)) == close_type && PyDict_DelItem(steady, conn))
            PyErr_Clear();   // the connection is over: its steady part is not asked for again
        // Everything written is ASCII (names, digits, escaped text): no need to check it again.
        PyObject *s = PyUnicode_New(b.len, 127);
        if (!s)
            goto fail;
        memcpy(PyUnicode_1BYTE_DATA(s), b.p, b.len);
        PyList_SET_ITEM(out, i, s);
    }
    PyMem_Free(b.p);
    return out;
fail:
    PyMem_Free(b.p);
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "configure(positions, record_len, type_names, state_names, role_names, "
                                           "family_names, syn_type_by_role, syn_state_by_role, flag_syn, close_type)"},
    {"finish", finish, METH_VARARGS, "finish(unpacked, out) -> bad: valid records into out, syn events inserted"},
    {"json_many", json_many, METH_VARARGS, "json_many(first_seq, recs, wall_offset_ns, steady) -> list[str]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "app._speedups",
                                    "Hot-path helpers in C; app/decode.py and app/models.py have the reference.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
