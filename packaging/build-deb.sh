#!/usr/bin/env bash
# Builds the Debian package: target/debian/turnstile_<version>_<arch>.deb.
#
#   bash packaging/build-deb.sh [--binary PATH] [--version V] [--out DIR] [--fast]
#
# Without --binary it builds the release binary first. --version defaults to
# Cargo.toml's; --fast compresses lightly (for tests). Only dpkg-deb and
# binutils' strip, both on any Debian 12 build box: no cargo-deb to compile.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
binary="" version="" out="$root/target/debian" compress=(-Zxz)
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --fast) compress=(-Zgzip -z1); shift ;;
    *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$version" ]; then
  version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -1)
fi
if [ -z "$binary" ]; then
  (cd "$root" && cargo build --release --locked)
  binary="$root/target/release/turnstile"
fi
arch=$(dpkg --print-architecture)
# The newest glibc symbol version the binary uses is the libc6 it needs.
glibc=$(objdump -T "$binary" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)

stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/turnstile" \
  "$stage/usr/share/doc/turnstile/docs" "$stage/usr/share/turnstile/prometheus" "$stage/usr/share/turnstile/grafana"
install -m 0755 "$binary" "$stage/usr/bin/turnstile"
strip --strip-debug "$stage/usr/bin/turnstile"
install -m 0644 "$root/systemd/turnstile.service" "$stage/lib/systemd/system/turnstile.service"
# The example config, as installed: every key at its default (the echo
# handler, the log gateway, loopback), the data in the state directory.
sed 's|^data_dir = "./data"$|data_dir = "/var/lib/turnstile"|' "$root/turnstile.example.toml" > "$stage/etc/turnstile/turnstile.toml"
grep -q '^data_dir = "/var/lib/turnstile"$' "$stage/etc/turnstile/turnstile.toml" \
  || { echo "build-deb.sh: turnstile.example.toml has no data_dir line to point at /var/lib/turnstile" >&2; exit 1; }
install -m 0640 "$root/packaging/secrets.env" "$stage/etc/turnstile/secrets.env"
chmod 0644 "$stage/etc/turnstile/turnstile.toml"
install -m 0644 "$root/README.md" "$root/ARCHITECTURE.md" "$stage/usr/share/doc/turnstile/"
docs=("$root"/docs/*)
if [ -e "${docs[0]}" ]; then
  install -m 0644 "${docs[@]}" "$stage/usr/share/doc/turnstile/docs/"
fi
install -m 0644 "$root/packaging/debian/copyright" "$stage/usr/share/doc/turnstile/copyright"
install -m 0644 "$root/deploy/prometheus/turnstile.rules.yml" "$root/deploy/prometheus/turnstile.rules.test.yml" \
  "$stage/usr/share/turnstile/prometheus/"
install -m 0644 "$root/deploy/grafana/turnstile.json" "$stage/usr/share/turnstile/grafana/"

for script in postinst prerm postrm; do
  install -m 0755 "$root/packaging/debian/$script" "$stage/DEBIAN/$script"
done
install -m 0644 "$root/packaging/debian/conffiles" "$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@GLIBC@/$glibc/" -e "s/@SIZE@/$size/" \
  "$root/packaging/debian/control.in" > "$stage/DEBIAN/control"
(cd "$stage" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' | sort -z | xargs -0 md5sum) \
  > "$stage/DEBIAN/md5sums"

mkdir -p "$out"
deb="$out/turnstile_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$stage" "$deb" >/dev/null
echo "$deb"
