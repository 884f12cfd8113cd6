// The per-event steps of the hot path that pure Python could not bring under budget (issue 8):
// decoding ring frames into records (validity check, shared objects for repeating values, the
// syn event a record carries), applying them to the connection table, writing each event's JSON
// (~0.9 us per event in Python) and folding closes into the traffic totals.
//
// Optional: setup.py builds it where a C compiler and Python headers exist. Without it,
// app/decode.py, app/table.py, app/models.py and app/traffic.py do the same in Python; those
// are the reference, and tests/test_speedups.py checks that both give identical results.
// Nothing about the record layout is written here: configure() receives the field positions
// and name tables from app/bpf/event.py.

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <arpa/inet.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

enum { F_TS, F_START, F_CONN, F_SENT, F_RECEIVED, F_RETRANS, F_CGROUP, F_PID, F_NETNS, F_SRTT, F_RTTVAR,
       F_RETRANS_SEGS, F_CONNECT, F_SADDR, F_DADDR, F_SPORT, F_DPORT, F_FAMILY, F_TYPE, F_ROLE, F_STATE, F_OLDSTATE,
       F_FLAGS, F_CLOSE_REASON, F_COMM, N_FIELDS };

static Py_ssize_t pos[N_FIELDS];   // position of each field in an event record tuple
static Py_ssize_t rec_len;         // fields in a record
static PyObject *type_names;       // tuple: number -> str or None (event types)
static PyObject *state_names;      // tuple: number -> str or None (TCP states)
static PyObject *role_names;       // tuple: number -> str
static PyObject *family_names;     // tuple: number -> str or None (4, 6)
static PyObject *syn_type_by_role;  // tuple of int objects, by role
static PyObject *syn_state_by_role;
static PyObject *reason_names;     // tuple: close reason number -> str or None
static long flag_syn, close_type;

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *positions, *tn, *sn, *rn, *fn, *syt, *sys, *crn;
    if (!PyArg_ParseTuple(args, "O!nO!O!O!O!O!O!O!ll", &PyTuple_Type, &positions, &rec_len, &PyTuple_Type, &tn,
                          &PyTuple_Type, &sn, &PyTuple_Type, &rn, &PyTuple_Type, &fn, &PyTuple_Type, &syt,
                          &PyTuple_Type, &sys, &PyTuple_Type, &crn, &flag_syn, &close_type))
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
    PyObject *tables[] = {tn, sn, rn, fn, syt, sys, crn};
    PyObject **slots[] = {&type_names, &state_names, &role_names, &family_names, &syn_type_by_role,
                          &syn_state_by_role, &reason_names};
    for (int i = 0; i < 7; i++) {
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

// Appends the syn_sent/syn_recv event a FLAG_SYN record stands for: this record's tuple, at
// start_ns, no bytes yet, the syn type and state of its role, without FLAG_SYN.
static int append_syn(PyObject *out, PyObject *rec, long flags, Py_ssize_t role) {
    PyObject *syn = PyTuple_New(rec_len);
    if (!syn)
        return -1;
    for (Py_ssize_t i = 0; i < rec_len; i++) {
        PyObject *v = PyTuple_GET_ITEM(rec, i);
        Py_INCREF(v);
        PyTuple_SET_ITEM(syn, i, v);
    }
    PyObject *zero = PyLong_FromLong(0);
    PyObject *fl = PyLong_FromLong(flags & ~flag_syn);
    if (!zero || !fl) {
        Py_XDECREF(zero);
        Py_XDECREF(fl);
        Py_DECREF(syn);
        return -1;
    }
    struct { int f; PyObject *v; } set[] = {
        {F_TS, FIELD(rec, F_START)}, {F_SENT, zero}, {F_RECEIVED, zero}, {F_RETRANS, zero}, {F_SRTT, zero},
        {F_RTTVAR, zero}, {F_RETRANS_SEGS, zero}, {F_CONNECT, zero}, {F_CLOSE_REASON, zero},
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
    return err;
}

// --- Decoding frames straight into records ------------------------------------------
// struct.iter_unpack makes a new object for every field of every record; most of those
// values repeat (addresses, ports, owners, namespaces, names). Reading the frames here
// reuses one object per recent distinct value (direct-mapped caches, no dict lookups) and
// allocates only what is new: the tuple, the timestamps, the connection id, the counters.

enum { K_U8 = 1, K_U16 = 2, K_U32 = 4, K_U64 = 8, K_BYTES16 = 16 };
static Py_ssize_t frame_size;
static Py_ssize_t field_off[N_FIELDS];   // offset in a frame of the record's field i (record order)
static int field_kind[N_FIELDS];
static char field_cached[N_FIELDS];   // is_repeating(i), decided once in configure_frames()

#define INT_CACHE 4096
static struct { unsigned long long key; PyObject *val; } int_cache[INT_CACHE];
#define BYTES_CACHE 4096
static struct { unsigned char key[16]; PyObject *val; } bytes_cache[BYTES_CACHE];

// Fields whose values repeat: looked up in the caches. The rest are made as they come.
static int is_repeating(Py_ssize_t i) {
    return i == pos[F_PID] || i == pos[F_NETNS] || i == pos[F_SPORT] || i == pos[F_DPORT] || i == pos[F_CGROUP] ||
           i == pos[F_CONNECT];
}

static PyObject *configure_frames(PyObject *self, PyObject *args) {
    PyObject *layout;
    if (!PyArg_ParseTuple(args, "nO!", &frame_size, &PyTuple_Type, &layout) || !configured())
        return NULL;
    if (PyTuple_GET_SIZE(layout) != rec_len || rec_len > N_FIELDS) {
        PyErr_SetString(PyExc_ValueError, "layout must have one (offset, size) per record field");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < rec_len; i++) {
        Py_ssize_t off, size;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(layout, i), "nn", &off, &size))
            return NULL;
        if (off < 0 || off + size > frame_size || (size != 1 && size != 2 && size != 4 && size != 8 && size != 16)) {
            PyErr_SetString(PyExc_ValueError, "bad field offset or size");
            return NULL;
        }
        field_off[i] = off;
        field_kind[i] = (int)size;
    }
    for (Py_ssize_t i = 0; i < rec_len; i++)
        field_cached[i] = (char)is_repeating(i);
    Py_RETURN_NONE;
}

static PyObject *cached_int(unsigned long long v) {
    if (v <= 256)
        return PyLong_FromUnsignedLongLong(v);   // CPython's own small ints
    size_t slot = (size_t)((v * 0x9E3779B97F4A7C15ULL) >> 52) % INT_CACHE;
    if (int_cache[slot].val && int_cache[slot].key == v) {
        Py_INCREF(int_cache[slot].val);
        return int_cache[slot].val;
    }
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    if (!o)
        return NULL;
    Py_XSETREF(int_cache[slot].val, o);
    Py_INCREF(o);
    int_cache[slot].key = v;
    return o;
}

static PyObject *cached_bytes16(const unsigned char *p) {
    unsigned long long a, b;
    memcpy(&a, p, 8);
    memcpy(&b, p + 8, 8);
    size_t slot = (size_t)(((a ^ (b * 0x9E3779B97F4A7C15ULL)) * 0xC2B2AE3D27D4EB4FULL) >> 40) % BYTES_CACHE;
    if (bytes_cache[slot].val && memcmp(bytes_cache[slot].key, p, 16) == 0) {
        Py_INCREF(bytes_cache[slot].val);
        return bytes_cache[slot].val;
    }
    PyObject *o = PyBytes_FromStringAndSize((const char *)p, 16);
    if (!o)
        return NULL;
    Py_XSETREF(bytes_cache[slot].val, o);
    Py_INCREF(o);
    memcpy(bytes_cache[slot].key, p, 16);
    return o;
}

// Fixed-size loads (a memcpy of a variable size is a call): the ring holds host order.
static inline unsigned long long read_uint(const unsigned char *p, int kind) {
    switch (kind) {
    case 1:
        return *p;
    case 2: {
        uint16_t v;
        memcpy(&v, p, 2);
        return v;
    }
    case 4: {
        uint32_t v;
        memcpy(&v, p, 4);
        return v;
    }
    default: {
        uint64_t v;
        memcpy(&v, p, 8);
        return v;
    }
    }
}

// decode(frames, out) -> bad: appends to `out` the record of every valid frame, each FLAG_SYN
// record preceded by its syn event; returns how many frames were not valid.
static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyObject *out;
    if (!PyArg_ParseTuple(args, "y*O!", &buf, &PyList_Type, &out))
        return NULL;
    if (!configured() || frame_size <= 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "_speedups.configure_frames() was not called");
        PyBuffer_Release(&buf);
        return NULL;
    }
    if (buf.len % frame_size) {
        PyErr_SetString(PyExc_ValueError, "frames are not a whole number of records");
        PyBuffer_Release(&buf);
        return NULL;
    }
    long bad = 0;
    const unsigned char *base = buf.buf;
    for (Py_ssize_t f = 0; f < buf.len / frame_size; f++) {
        const unsigned char *fr = base + f * frame_size;
        unsigned long long type = read_uint(fr + field_off[pos[F_TYPE]], field_kind[pos[F_TYPE]]);
        unsigned long long state = read_uint(fr + field_off[pos[F_STATE]], field_kind[pos[F_STATE]]);
        unsigned long long family = read_uint(fr + field_off[pos[F_FAMILY]], field_kind[pos[F_FAMILY]]);
        unsigned long long role = read_uint(fr + field_off[pos[F_ROLE]], field_kind[pos[F_ROLE]]);
        if (type >= (unsigned long long)PyTuple_GET_SIZE(type_names) ||
            !PyUnicode_Check(PyTuple_GET_ITEM(type_names, type)) ||
            state >= (unsigned long long)PyTuple_GET_SIZE(state_names) ||
            !PyUnicode_Check(PyTuple_GET_ITEM(state_names, state)) ||
            family >= (unsigned long long)PyTuple_GET_SIZE(family_names) ||
            !PyUnicode_Check(PyTuple_GET_ITEM(family_names, family)) ||
            role >= (unsigned long long)PyTuple_GET_SIZE(role_names) ||
            role >= (unsigned long long)PyTuple_GET_SIZE(syn_type_by_role) ||
            role >= (unsigned long long)PyTuple_GET_SIZE(syn_state_by_role)) {
            bad++;
            continue;
        }
        PyObject *rec = PyTuple_New(rec_len);
        if (!rec)
            goto fail;
        for (Py_ssize_t i = 0; i < rec_len; i++) {
            const unsigned char *p = fr + field_off[i];
            PyObject *v;
            if (field_kind[i] == K_BYTES16)
                v = cached_bytes16(p);
            else if (field_cached[i])
                v = cached_int(read_uint(p, field_kind[i]));
            else
                v = PyLong_FromUnsignedLongLong(read_uint(p, field_kind[i]));
            if (!v) {
                Py_DECREF(rec);
                goto fail;
            }
            PyTuple_SET_ITEM(rec, i, v);
        }
        long flags = (long)read_uint(fr + field_off[pos[F_FLAGS]], field_kind[pos[F_FLAGS]]);
        if ((flags & flag_syn) && append_syn(out, rec, flags, (Py_ssize_t)role)) {
            Py_DECREF(rec);
            goto fail;
        }
        int err = PyList_Append(out, rec);
        Py_DECREF(rec);
        if (err)
            goto fail;
    }
    PyBuffer_Release(&buf);
    return PyLong_FromLong(bad);
fail:
    PyBuffer_Release(&buf);
    return NULL;
}

// --- JSON ---------------------------------------------------------------------------

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} buf_t;

static int buf_grow(buf_t *b, Py_ssize_t need) {
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

// Inlined: most puts are literals of a known length, which the compiler then copies in place.
static inline __attribute__((always_inline)) int buf_put(buf_t *b, const char *s, Py_ssize_t n) {
    if (b->len + n > b->cap && buf_grow(b, n))
        return -1;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

// Decimal digits without printf (vsnprintf was most of the cost of an event's JSON).
// Two digits per division: timestamps in ns have 19 digits, and every event has several.
static const char digit_pairs[] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

static int buf_u64(buf_t *b, unsigned long long v) {
    char tmp[24];
    int i = sizeof(tmp);
    while (v >= 100) {
        unsigned d = (unsigned)(v % 100) * 2;
        v /= 100;
        tmp[--i] = digit_pairs[d + 1];
        tmp[--i] = digit_pairs[d];
    }
    if (v >= 10) {
        tmp[--i] = digit_pairs[v * 2 + 1];
        tmp[--i] = digit_pairs[v * 2];
    } else {
        tmp[--i] = (char)('0' + v);
    }
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

// Formatted addresses, direct-mapped by their bytes: inet_ntop formats through sprintf, which was
// a tenth of the JSON's cost, and a host talks to few distinct addresses at a time.
#define ADDR_CACHE 256
static struct {
    unsigned char key[16];
    long family;
    char text[INET6_ADDRSTRLEN];
    Py_ssize_t len;
} addr_cache[ADDR_CACHE];

static int buf_addr(buf_t *b, PyObject *raw, long family) {
    if (!PyBytes_Check(raw) || PyBytes_GET_SIZE(raw) < 16) {
        PyErr_SetString(PyExc_ValueError, "address must be 16 bytes");
        return -1;
    }
    const unsigned char *k = (const unsigned char *)PyBytes_AS_STRING(raw);
    unsigned h = family;
    for (int i = 0; i < 16; i++)
        h = h * 31 + k[i];
    h = (h ^ (h >> 8) ^ (h >> 16)) % ADDR_CACHE;
    if (addr_cache[h].len == 0 || addr_cache[h].family != family || memcmp(addr_cache[h].key, k, 16)) {
        if (!inet_ntop(family == 4 ? AF_INET : AF_INET6, k, addr_cache[h].text, INET6_ADDRSTRLEN)) {
            addr_cache[h].len = 0;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        memcpy(addr_cache[h].key, k, 16);
        addr_cache[h].family = family;
        addr_cache[h].len = (Py_ssize_t)strlen(addr_cache[h].text);
    }
    return buf_put(b, addr_cache[h].text, addr_cache[h].len);
}

// The JSON of the fields that do not change over a connection, ending with tail(cgroup_id): cgroup,
// container and host, and the closing '}'.
static PyObject *steady_json(PyObject *rec, PyObject *tails, PyObject *tail_fn) {
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
    // Ids from 2**63 up are sockets found at start-up: p<cookie> (app/bpf/event.py PREEXISTING_ID).
    int pre = conn >= (1ULL << 63);
    if ((pre ? PUT_LIT(&b, "\"conn_id\":\"p") : PUT_LIT(&b, "\"conn_id\":\"c")) ||
        buf_u64(&b, pre ? conn - (1ULL << 63) : conn) || PUT_LIT(&b, "\",\"family\":\"") ||
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
    if (PUT_LIT(&b, ",\"netns\":") || buf_u64(&b, netns))
        goto done;
    // tails caches tail_fn's answers by cgroup id (Texts._tails): a call only for a new cgroup.
    PyObject *tail = PyDict_GetItemWithError(tails, FIELD(rec, F_CGROUP));
    if (tail)
        Py_INCREF(tail);
    else if (!PyErr_Occurred())
        tail = PyObject_CallOneArg(tail_fn, FIELD(rec, F_CGROUP));
    if (!tail)
        goto done;
    if (!PyUnicode_Check(tail) || !PyUnicode_IS_ASCII(tail)) {
        PyErr_SetString(PyExc_ValueError, "steady tail must be ASCII str");
        Py_DECREF(tail);
        goto done;
    }
    int terr = buf_str(&b, tail);
    Py_DECREF(tail);
    if (terr)
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

// Writes `"name":N` with N the u32 field, or null when `null_if_zero` and it is 0.
static int put_opt(buf_t *b, const char *name, Py_ssize_t len, unsigned long long v, int null_if_zero) {
    if (buf_put(b, name, len))
        return -1;
    return (null_if_zero && !v) ? PUT_LIT(b, "null") : buf_u64(b, v);
}

// json_many(first_seq, recs, wall_offset_ns, steady, tails, tail) -> list[str]: the JSON of each event,
// numbered from first_seq. `steady` caches each connection's steady part:
// conn_id -> (pid, sport, text); bounded; a close event's entry is dropped after use.
// tail(cgroup_id) -> str ends the steady part (Texts.steady_tail), `tails` caches its answers.
static PyObject *json_many(PyObject *self, PyObject *args) {
    long long seq, offset;
    PyObject *recs, *steady, *tails, *tail_fn;
    if (!PyArg_ParseTuple(args, "LO!LO!O!O", &seq, &PyList_Type, &recs, &offset, &PyDict_Type, &steady,
                          &PyDict_Type, &tails, &tail_fn) ||
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
            text = steady_json(rec, tails, tail_fn);
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
        unsigned long long segs = PyLong_AsUnsignedLongLong(FIELD(rec, F_RETRANS_SEGS));
        unsigned long long srtt = PyLong_AsUnsignedLongLong(FIELD(rec, F_SRTT));
        unsigned long long rttvar = PyLong_AsUnsignedLongLong(FIELD(rec, F_RTTVAR));
        unsigned long long connect = PyLong_AsUnsignedLongLong(FIELD(rec, F_CONNECT));
        PyObject *reason = lookup_name(reason_names, FIELD(rec, F_CLOSE_REASON));
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
                  PUT_LIT(&b, ",\"bytes_retrans\":") || buf_u64(&b, retrans) ||
                  PUT_LIT(&b, ",\"retrans_segs\":") || buf_u64(&b, segs) ||
                  put_opt(&b, ",\"srtt_us\":", 11, srtt, 1) ||
                  (srtt ? put_opt(&b, ",\"rttvar_us\":", 13, rttvar, 0) : PUT_LIT(&b, ",\"rttvar_us\":null")) ||
                  put_opt(&b, ",\"connect_us\":", 14, connect, 1) || PUT_LIT(&b, ",\"close_reason\":") ||
                  (reason && PyUnicode_IS_ASCII(reason)
                       ? (PUT_LIT(&b, "\"") || buf_str(&b, reason) || PUT_LIT(&b, "\""))
                       : PUT_LIT(&b, "null")) ||
                  PUT_LIT(&b, ",") || buf_str(&b, text);
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

// --- Traffic totals ---------------------------------------------------------------------------
// traffic_fold(recs, bounds_us) -> list of ints, app/traffic.py's fold() in one pass:
//   [0:12]   closes by role (2) x close reason (0..5)
//   [12:20]  sums by field (bytes_sent, bytes_received, bytes_retrans, retrans_segs) x role
//   then for connect_us and srtt_us, by role: len(bounds)+1 bucket counts (values of 0 not counted),
//   and the sum of the values.
static PyObject *traffic_fold(PyObject *self, PyObject *args) {
    PyObject *recs, *bounds;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &recs, &PyTuple_Type, &bounds) || !configured())
        return NULL;
    enum { NB_MAX = 64 };
    Py_ssize_t nb = PyTuple_GET_SIZE(bounds);
    if (nb > NB_MAX) {
        PyErr_SetString(PyExc_ValueError, "too many buckets");
        return NULL;
    }
    double bound[NB_MAX];
    for (Py_ssize_t i = 0; i < nb; i++) {
        bound[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (PyErr_Occurred())
            return NULL;
    }
    unsigned long long closed[2][6] = {{0}}, sums[4][2] = {{0}}, hist[2][2][NB_MAX + 1], hsum[2][2] = {{0}};
    memset(hist, 0, sizeof(hist));
    const int sum_fields[4] = {F_SENT, F_RECEIVED, F_RETRANS, F_RETRANS_SEGS};
    const int hist_fields[2] = {F_CONNECT, F_SRTT};
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(recs); i++) {
        PyObject *rec = PyList_GET_ITEM(recs, i);
        if (!PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) < rec_len) {
            PyErr_SetString(PyExc_TypeError, "not an event record");
            return NULL;
        }
        unsigned long long role = PyLong_AsUnsignedLongLong(FIELD(rec, F_ROLE));
        unsigned long long reason = PyLong_AsUnsignedLongLong(FIELD(rec, F_CLOSE_REASON));
        if (PyErr_Occurred())
            return NULL;
        role = role ? 1 : 0;
        closed[role][reason < 6 ? reason : 0]++;
        for (int f = 0; f < 4; f++) {
            sums[f][role] += PyLong_AsUnsignedLongLong(FIELD(rec, sum_fields[f]));
        }
        for (int h = 0; h < 2; h++) {
            unsigned long long v = PyLong_AsUnsignedLongLong(FIELD(rec, hist_fields[h]));
            if (!v)
                continue;
            Py_ssize_t b = 0;   // bisect_left: the first bound >= v
            while (b < nb && bound[b] < (double)v)
                b++;
            hist[h][role][b]++;
            hsum[h][role] += v;
        }
        if (PyErr_Occurred())
            return NULL;
    }
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
#define PUSH(x)                                                                   \
    do {                                                                          \
        PyObject *o_ = PyLong_FromUnsignedLongLong(x);                            \
        if (!o_ || PyList_Append(out, o_)) {                                      \
            Py_XDECREF(o_);                                                       \
            Py_DECREF(out);                                                       \
            return NULL;                                                          \
        }                                                                         \
        Py_DECREF(o_);                                                            \
    } while (0)
    for (int r = 0; r < 2; r++)
        for (int c = 0; c < 6; c++)
            PUSH(closed[r][c]);
    for (int f = 0; f < 4; f++)
        for (int r = 0; r < 2; r++)
            PUSH(sums[f][r]);
    for (int h = 0; h < 2; h++)
        for (int r = 0; r < 2; r++) {
            for (Py_ssize_t b = 0; b <= nb; b++)
                PUSH(hist[h][r][b]);
            PUSH(hsum[h][r]);
        }
#undef PUSH
    return out;
}

// --- The connection table's hot path ----------------------------------------------------------
// app/table.py's ConnEntry and ConnectionTable.apply_many() (the reference, used without this
// module). At max churn the Python loop cost ~0.45 us per event, and each slotted ConnEntry was a
// GC-tracked object. An entry here holds a record tuple, two ints and a bytes: nothing that can
// form a cycle, so it is not tracked at all.

typedef struct {
    PyObject_HEAD
    PyObject *rec;        // the connection's latest event record
    long long events;     // events applied (0 for a connection found open at start-up)
    PyObject *pid;        // the owner once known: a later record without one keeps it
    PyObject *comm;
    PyObject *close_ns;   // 0 while open
    char preexisting;
    int missing;          // sweeps in a row that did not find the socket in the kernel
} EntryObject;

static PyTypeObject EntryType;

static EntryObject *entry_new(PyObject *rec, int preexisting) {
    EntryObject *e = PyObject_New(EntryObject, &EntryType);
    if (!e)
        return NULL;
    Py_INCREF(rec);
    e->rec = rec;
    e->events = preexisting ? 0 : 1;
    e->pid = Py_NewRef(FIELD(rec, F_PID));
    e->comm = Py_NewRef(FIELD(rec, F_COMM));
    e->close_ns = PyLong_FromLong(0);
    e->preexisting = (char)preexisting;
    e->missing = 0;
    if (!e->close_ns) {
        Py_DECREF(e);
        return NULL;
    }
    return e;
}

// At least the kernel record's fields: the fleet view's records carry HOST and TEXT after them.
static int is_record(PyObject *rec) {
    if (PyTuple_Check(rec) && PyTuple_GET_SIZE(rec) >= rec_len)
        return 1;
    PyErr_SetString(PyExc_TypeError, "not an event record");
    return 0;
}

static PyObject *entry_tp_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *names[] = {"rec", "preexisting", NULL};
    PyObject *rec;
    int preexisting = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|p:ConnEntry", names, &rec, &preexisting) || !configured() ||
        !is_record(rec))
        return NULL;
    return (PyObject *)entry_new(rec, preexisting);
}

static void entry_dealloc(EntryObject *e) {
    Py_XDECREF(e->rec);
    Py_XDECREF(e->pid);
    Py_XDECREF(e->comm);
    Py_XDECREF(e->close_ns);
    PyObject_Free(e);
}

static PyMemberDef entry_members[] = {
    {"rec", T_OBJECT_EX, offsetof(EntryObject, rec), 0, NULL},
    {"events", T_LONGLONG, offsetof(EntryObject, events), 0, NULL},
    {"pid", T_OBJECT_EX, offsetof(EntryObject, pid), 0, NULL},
    {"comm", T_OBJECT_EX, offsetof(EntryObject, comm), 0, NULL},
    {"close_ns", T_OBJECT_EX, offsetof(EntryObject, close_ns), 0, NULL},
    {"preexisting", T_BOOL, offsetof(EntryObject, preexisting), 0, NULL},
    {"missing", T_INT, offsetof(EntryObject, missing), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject EntryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "app._speedups.ConnEntry",
    .tp_basicsize = sizeof(EntryObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One connection: its latest record, plus what records alone do not say (app/table.py ConnEntry).",
    .tp_new = entry_tp_new,
    .tp_dealloc = (destructor)entry_dealloc,
    .tp_members = entry_members,
};

// Calls f(arg) and drops the result; -1 on error.
static int call_drop(PyObject *f, PyObject *arg) {
    PyObject *r = PyObject_CallOneArg(f, arg);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

// table_apply(recs, open, closed, move_to_end, popitem_closed, first_sight, twins_before, max_open, max_closed)
//   -> (close records, closed connections evicted): ConnectionTable.apply_many()'s loop, the same steps
// in the same order. `open` and `closed` are the table's OrderedDicts, `move_to_end` and `popitem_closed`
// their bound methods; `first_sight(rec)` takes every record of a connection that is not open.
static PyObject *table_apply(PyObject *self, PyObject *args) {
    PyObject *recs, *open, *closed, *move_to_end, *popitem_closed, *first_sight;
    long long twins_before;
    Py_ssize_t max_open, max_closed;
    if (!PyArg_ParseTuple(args, "O!O!O!OOOLnn", &PyList_Type, &recs, &PyDict_Type, &open, &PyDict_Type, &closed,
                          &move_to_end, &popitem_closed, &first_sight, &twins_before, &max_open, &max_closed) ||
        !configured())
        return NULL;
    PyObject *closes = PyList_New(0);
    if (!closes)
        return NULL;
    long long evicted = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(recs); i++) {
        PyObject *rec = PyList_GET_ITEM(recs, i);
        if (!is_record(rec))
            goto fail;
        PyObject *cid = FIELD(rec, F_CONN);
        long type = PyLong_AsLong(FIELD(rec, F_TYPE));
        if (type == -1 && PyErr_Occurred())
            goto fail;
        PyObject *found = PyDict_GetItemWithError(open, cid);   // borrowed
        if (!found) {
            if (PyErr_Occurred())
                goto fail;
            int known = PyDict_Contains(closed, cid);
            if (known < 0)
                goto fail;
            long long start = PyLong_AsLongLong(FIELD(rec, F_START));
            if (start == -1 && PyErr_Occurred())
                goto fail;
            if (known || start <= twins_before || PyDict_GET_SIZE(open) >= max_open || type == close_type) {
                if (call_drop(first_sight, rec))
                    goto fail;
                continue;
            }
            PyObject *e = (PyObject *)entry_new(rec, 0);
            if (!e)
                goto fail;
            int err = PyObject_SetItem(open, cid, e);
            Py_DECREF(e);
            if (err)
                goto fail;
            continue;
        }
        if (!Py_IS_TYPE(found, &EntryType)) {
            PyErr_SetString(PyExc_TypeError, "open connection is not a ConnEntry");
            goto fail;
        }
        EntryObject *c = (EntryObject *)found;
        Py_INCREF(rec);
        Py_SETREF(c->rec, rec);
        c->events++;
        int has_pid = PyObject_IsTrue(FIELD(rec, F_PID));
        if (has_pid < 0)
            goto fail;
        if (has_pid) {
            Py_INCREF(FIELD(rec, F_PID));
            Py_SETREF(c->pid, FIELD(rec, F_PID));
            Py_INCREF(FIELD(rec, F_COMM));
            Py_SETREF(c->comm, FIELD(rec, F_COMM));
        }
        if (type != close_type) {
            if (call_drop(move_to_end, cid))
                goto fail;
            continue;
        }
        PyObject *ts = FIELD(rec, F_TS);
        int ts_set = PyObject_IsTrue(ts);
        if (ts_set < 0)
            goto fail;
        PyObject *close_ns = ts_set ? Py_NewRef(ts) : PyLong_FromLong(1);
        if (!close_ns)
            goto fail;
        Py_SETREF(c->close_ns, close_ns);
        Py_INCREF(c);   // `open` held the only reference
        Py_INCREF(cid);
        int err = PyObject_DelItem(open, cid) || PyList_Append(closes, rec);
        if (!err && max_closed <= 0) {
            evicted++;
        } else if (!err) {
            err = PyObject_SetItem(closed, cid, (PyObject *)c);
            while (!err && PyDict_GET_SIZE(closed) > max_closed) {
                err = call_drop(popitem_closed, Py_False);
                evicted++;
            }
        }
        Py_DECREF(cid);
        Py_DECREF(c);
        if (err)
            goto fail;
    }
    return Py_BuildValue("(NL)", closes, evicted);
fail:
    Py_DECREF(closes);
    return NULL;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "configure(positions, record_len, type_names, state_names, role_names, "
                                           "family_names, syn_type_by_role, syn_state_by_role, close_reason_names, "
                                           "flag_syn, close_type)"},
    {"configure_frames", configure_frames, METH_VARARGS, "configure_frames(frame_size, ((offset, size), ...))"},
    {"decode", decode, METH_VARARGS, "decode(frames, out) -> bad: each valid frame's record into out, syn events inserted"},
    {"json_many", json_many, METH_VARARGS, "json_many(first_seq, recs, wall_offset_ns, steady, tails, tail) -> list[str]"},
    {"table_apply", table_apply, METH_VARARGS,
     "table_apply(recs, open, closed, move_to_end, popitem_closed, first_sight, twins_before, max_open, max_closed) "
     "-> (closes, evicted) (app/table.py apply_many)"},
    {"traffic_fold", traffic_fold, METH_VARARGS, "traffic_fold(recs, bounds_us) -> list[int] (app/traffic.py fold)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "app._speedups",
                                    "Hot-path helpers in C; app/decode.py and app/models.py have the reference.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__speedups(void) {
    if (PyType_Ready(&EntryType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&EntryType);
    if (PyModule_AddObject(m, "ConnEntry", (PyObject *)&EntryType) < 0) {
        Py_DECREF(&EntryType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
