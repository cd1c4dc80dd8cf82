#!/bin/sh
# Installs the benchmark's peers from Debian packages: nginx with the nchan module, mosquitto, prosody;
# and matplotlib into the project venv for the plots.
# Idempotent: does nothing when everything is present. Never enables or starts a system service:
# the packages' maintainer scripts are held back by a policy-rc.d that refuses every start (101), and
# the bench (bench/peers.py) runs each peer itself on a loopback port with a generated config.
set -eu

PKGS="nginx libnginx-mod-nchan mosquitto prosody"
VENV_PY="${VENV_PY:-/work/main/.venv/bin/python}"

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done

if [ -n "$missing" ]; then
    policy=/usr/sbin/policy-rc.d
    created_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        created_policy=yes
    fi
    trap '[ -n "$created_policy" ] && rm -f "$policy"' EXIT
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

if [ -x "$VENV_PY" ] && ! "$VENV_PY" -c "import matplotlib" 2>/dev/null; then
    "$VENV_PY" -m pip install -q matplotlib
fi

# A venv on Debian's optimized /usr/bin/python3.11 (PGO/LTO build; 1.2-2.4x faster than the pyenv
# python on Python-heavy paths here) with imd's dependencies, so the bench can run imd under both:
#   python bench/run.py --imd-python .venv-debian/bin/python
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DEB_VENV="$REPO/.venv-debian"
if [ -x /usr/bin/python3.11 ] && [ ! -x "$DEB_VENV/bin/python" ]; then
    /usr/bin/python3.11 -m venv "$DEB_VENV"
fi
if [ -x "$DEB_VENV/bin/python" ] && ! "$DEB_VENV/bin/python" -c "import gevent, orjson, jwt, psycopg" 2>/dev/null; then
    deps=$(/usr/bin/python3.11 -c "import tomllib; print(' '.join(tomllib.load(open('$REPO/pyproject.toml', 'rb'))['project']['dependencies']))")
    "$DEB_VENV/bin/python" -m pip install -q $deps
fi

echo "peers: $(nginx -v 2>&1 | sed 's/.*: //'), mosquitto $(dpkg-query -W -f='${Version}' mosquitto)," \
     "prosody $(dpkg-query -W -f='${Version}' prosody), nchan $(dpkg-query -W -f='${Version}' libnginx-mod-nchan)"
