#!/usr/bin/env bash
# Install the Debian tools the tests use, only when their binaries are missing (idempotent).
#   prometheus  -> promtool        (package: prometheus)
#   alertmanager-> amtool          (package: prometheus-alertmanager)
#   chromium    -> chromium, chromedriver (packages: chromium, chromium-driver; used by dashboard tests)
#   compose     -> docker-compose  (package: docker-compose; validates compose.yaml, needs no Docker daemon)
# Usage: scripts/install-debian-tools.sh [prometheus] [chromium] [compose]   (no argument: everything)
# Runs as root (or through sudo when available). Services the packages ship are never started here.
set -euo pipefail

groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(prometheus chromium compose)

need=()
for group in "${groups[@]}"; do
  case "$group" in
    prometheus)
      command -v promtool >/dev/null 2>&1 || need+=(prometheus)
      command -v amtool >/dev/null 2>&1 || need+=(prometheus-alertmanager)
      ;;
    chromium)
      command -v chromium >/dev/null 2>&1 || need+=(chromium)
      command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
      ;;
    compose)
      command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
      ;;
    *)
      echo "install-debian-tools: unknown group '$group' (allowed: prometheus, chromium, compose)" >&2
      exit 2
      ;;
  esac
done

if [ ${#need[@]} -eq 0 ]; then
  echo "install-debian-tools: already installed (${groups[*]})"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-debian-tools: apt-get not found; install ${need[*]} with your package manager" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-debian-tools: not root and no sudo; cannot install ${need[*]}" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-debian-tools: apt-get update"
$SUDO apt-get update -q
echo "install-debian-tools: installing ${need[*]}"
# --no-install-recommends keeps the prometheus packages from pulling in exporters and web assets we never run.
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
for bin in promtool amtool chromium chromedriver docker-compose; do
  if command -v "$bin" >/dev/null 2>&1; then echo "install-debian-tools: $bin -> $(command -v "$bin")"; fi
done
