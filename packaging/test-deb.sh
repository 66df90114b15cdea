#!/usr/bin/env bash
# Install the amd64 .deb made by `cargo deb` on this machine (as root), check what it put
# where, run `scangate validate` on the installed config, then remove and purge it and check
# that nothing of it is left but the state dir (kept: it may hold undelivered events).
# CI runs it (`.ci/run`); it changes the machine, so run it on a throwaway one.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(ls -t target/debian/scangate_*_amd64.deb | head -1)
fail() { echo "test-deb: $*" >&2; exit 1; }

dpkg -i "$deb"
dpkg -s scangate | grep -q '^Status: install ok installed' || fail "not installed"
test -x /usr/bin/scangate || fail "no /usr/bin/scangate"
test -f /usr/lib/systemd/system/scangate.service || fail "no unit"
grep -q '^/etc/scangate/scangate.toml$' /var/lib/dpkg/info/scangate.conffiles || fail "config is not a conffile"
id scangate >/dev/null || fail "no scangate user"
id -nG scangate | tr ' ' '\n' | grep -qx dialout || fail "scangate is not in dialout"
test -d /var/lib/scangate || fail "no state dir"
[ "$(stat -c %U /var/lib/scangate)" = scangate ] || fail "state dir not owned by scangate"
# The installed config is valid, read as the service reads it (as the scangate user).
su -s /bin/sh scangate -c "/usr/bin/scangate validate --config /etc/scangate/scangate.toml" \
    || fail "the installed config does not validate"
/usr/bin/scangate --version
echo "== systemd-analyze verify / security of the installed unit"
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify /usr/lib/systemd/system/scangate.service || fail "unit does not verify"
    score=$(systemd-analyze security --offline=yes /usr/lib/systemd/system/scangate.service | tail -1)
    echo "$score"
    # The unit's exposure must stay at or below 2.0.
    exposure=$(echo "$score" | grep -oE '[0-9]+\.[0-9]+' | head -1)
    awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 2.0) }' || fail "exposure $exposure is above 2.0"
fi

# A technician's edit survives an upgrade (conffile), then remove and purge.
echo "# edited" >> /etc/scangate/scangate.toml
dpkg -i "$deb"
tail -1 /etc/scangate/scangate.toml | grep -q '^# edited$' || fail "an upgrade overwrote the edited config"
dpkg -r scangate
test ! -e /usr/bin/scangate || fail "binary left after remove"
test -f /etc/scangate/scangate.toml || fail "remove (not purge) deleted the config"
dpkg -P scangate
test ! -e /etc/scangate/scangate.toml || fail "purge left the config"
test ! -e /usr/lib/systemd/system/scangate.service || fail "purge left the unit"
dpkg -s scangate >/dev/null 2>&1 && fail "still known to dpkg"
echo "test-deb: ok ($deb)"
