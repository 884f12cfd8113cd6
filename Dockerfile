# syntax=docker/dockerfile:1
# conn-tracer: host agent image. Runs as root: loading BPF programs needs CAP_BPF/CAP_PERFMON/
# CAP_SYS_ADMIN, so the container is privileged and shares the host's PID and network namespaces
# (see docker-compose.yml).
#
# Kernel headers: bcc compiles its C at run time and refuses to start without a header tree at
# /lib/modules/$(uname -r)/build (+ .../source). None ship in this image by default; compose mounts
# the host's /lib/modules and /usr/src read-only instead. A host without headers for its own kernel
# should, on the host:
#     apt-get install linux-headers-amd64 && scripts/setup.sh
# (setup.sh makes the /lib/modules/$(uname -r)/{build,source} links to Debian's generic headers;
# conn-tracer reads every kernel struct offset from BTF, so generic headers are enough, see
# KERNEL.md). Or build with --build-arg WITH_GENERIC_HEADERS=1 to put linux-headers-amd64 in the
# image; then drop the /lib/modules and /usr/src mounts, which would hide them, and the entrypoint
# makes the links at start.
FROM debian:bookworm-slim

ARG WITH_GENERIC_HEADERS=0

# bcc is not on PyPI: Debian's python3-bpfcc (+ libbpfcc) is the only bcc here, hence the
# --system-site-packages venv below. libbpf1 is loaded with ctypes for BTF offsets; bpftool and
# iproute2 are for `conn-tracer check` and for debugging on the host.
RUN set -eux; \
    apt-get update; \
    pkgs="python3 python3-venv python3-bpfcc libbpfcc libbpf1 bpftool iproute2 ca-certificates"; \
    if [ "$WITH_GENERIC_HEADERS" = "1" ]; then pkgs="$pkgs linux-headers-amd64"; fi; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/conn-tracer/.venv \
    PATH=/opt/conn-tracer/.venv/bin:$PATH

WORKDIR /opt/conn-tracer

# Debian's /usr/bin/python3 with --system-site-packages so `import bcc` resolves to python3-bpfcc.
RUN python3 -m venv --system-site-packages /opt/conn-tracer/.venv

COPY pyproject.toml ./
COPY app/ ./app/
COPY web/ ./web/
# Editable install: the package stays at /opt/conn-tracer/app next to web/, the same layout as a
# checkout, so anything found relative to the source tree (the dashboard) is found here too.
RUN pip install --no-cache-dir -e . && python -c "import bcc, app"

# Only acts when the image carries its own generic headers (WITH_GENERIC_HEADERS=1) and the running
# kernel has no header tree: makes the two links bcc needs. A read-only host mount is left alone;
# `conn-tracer check` then says what is missing.
COPY --chmod=0755 <<'SH' /usr/local/bin/conn-tracer-entrypoint
#!/bin/sh
set -e
rel="$(uname -r)"
if [ ! -e "/lib/modules/$rel/build" ]; then
    build="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)"
    common="${build%-amd64}-common"
    if [ -n "$build" ] && [ -d "$common" ] && mkdir -p "/lib/modules/$rel" 2>/dev/null \
        && ln -sfn "$build" "/lib/modules/$rel/build" 2>/dev/null \
        && ln -sfn "$common" "/lib/modules/$rel/source" 2>/dev/null; then
        echo "conn-tracer: linked /lib/modules/$rel/{build,source} to $build" >&2
    fi
fi
exec "$@"
SH
ENTRYPOINT ["/usr/local/bin/conn-tracer-entrypoint"]

EXPOSE 8000

# stdlib only (no curl in the image); urlopen raises on 503, so an unattached tracer is unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; h = os.environ.get('CONN_TRACER_HOST', '127.0.0.1'); h = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); h = '[' + h + ']' if ':' in h else h; u.urlopen('http://' + h + ':' + os.environ.get('CONN_TRACER_PORT', '8000') + '/healthz', timeout=4)"]

# SIGTERM detaches every BPF program and exits 0 (API.md).
STOPSIGNAL SIGTERM
CMD ["conn-tracer", "serve", "--host", "0.0.0.0", "--port", "8000"]
