#!/usr/bin/env python3
"""The deploy files against the code they deploy (run by deploy/validate.sh).

    contract.py CHECK REPO [NAME=RENDERED.yaml ...]

CHECK is one of
  env      every variable a manifest or docker-compose.yml sets on a mesh
           container is one its binary reads: a string literal of the
           binary's own crate or of a mesh crate it depends on (from the
           Cargo.toml files; test modules excluded), or one a locked
           third-party crate reads (looked up in that crate's source)
  ports    containerPorts, Service ports and compose ports are each
           service's DEFAULT_PORT and that + 1000 for metrics
  probes   every gRPC probe's `service:` and every compose healthcheck's
           `-service=` is a health name the runtime registers
           (libs/runtime/src/health.rs)
  rules    every rate-limit domain a service sends Checks to (its
           configuration default, or MESH_<SVC>_RATELIMIT_DOMAIN where a
           manifest sets it) is defined, with every descriptor key the
           service sends, in every shipped rules set: each rendered
           ConfigMap, compose's mounted rules, the local stack's file
  links    every relative link in the repository's Markdown resolves (its
           #heading too), and none points outside the repository (../shared)

Prints one line per problem; exits 1 if there is any.
"""
import glob
import os
import re
import subprocess
import sys
import tarfile
import tomllib

import yaml

SERVICES = ("session", "ratelimit", "audit", "data")
problems = []


def err(msg):
    problems.append(msg)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def without_tests(text):
    """Rust source up to its first `#[cfg(test)]`: names used only by tests do not count."""
    i = text.find("#[cfg(test)]")
    return text if i < 0 else text[:i]


def rendered(args):
    out = {}
    for arg in args:
        name, path = arg.split("=", 1)
        out[name] = [d for d in yaml.safe_load_all(read(path)) if d]
    return out


def compose(repo):
    return yaml.safe_load(read(os.path.join(repo, "docker-compose.yml")))


# ------------------------------------------------------------------ code facts
def crate_dirs(repo):
    """mesh crate name -> its directory."""
    out = {}
    for toml in glob.glob(os.path.join(repo, "*/*/Cargo.toml")):
        pkg = tomllib.loads(read(toml)).get("package", {})
        if pkg.get("name", "").startswith("mesh-"):
            out[pkg["name"]] = os.path.dirname(toml)
    return out


def mesh_deps(repo, crate, dirs, seen=None):
    """The crate and every mesh crate it depends on (normal dependencies)."""
    seen = set() if seen is None else seen
    if crate in seen or crate not in dirs:
        return seen
    seen.add(crate)
    deps = tomllib.loads(read(os.path.join(dirs[crate], "Cargo.toml"))).get("dependencies", {})
    for dep in deps:
        mesh_deps(repo, dep, dirs, seen)
    return seen


def names_read(repo, binary):
    """Environment names that appear as string literals in the binary's crates."""
    dirs = crate_dirs(repo)
    names = set()
    for crate in mesh_deps(repo, binary, dirs):
        for rs in glob.glob(os.path.join(dirs[crate], "src", "**", "*.rs"), recursive=True):
            names |= set(re.findall(r'"((?:MESH|OTEL)_[A-Z0-9_]+|RUST_LOG)"', without_tests(read(rs))))
    return names


# Names read by third-party crates the binaries link: (crate, what reads it).
THIRD_PARTY = {
    "PGPASSWORD": ("sqlx-postgres", "sqlx, like libpq, for a URL without a password"),
    "OTEL_RESOURCE_ATTRIBUTES": ("opentelemetry_sdk", "Resource::builder's environment detector"),
}


def locked_version(repo, crate):
    lock = tomllib.loads(read(os.path.join(repo, "Cargo.lock")))
    versions = [p["version"] for p in lock["package"] if p["name"] == crate]
    return versions[-1] if versions else None


def third_party_reads(repo, name):
    crate, _ = THIRD_PARTY[name]
    version = locked_version(repo, crate)
    if not version:
        return f"{crate} is not in Cargo.lock"
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    needle = f'"{name}"'
    srcs = glob.glob(os.path.join(home, "registry", "src", "*", f"{crate}-{version}", "src"))
    if srcs:
        found = subprocess.run(["grep", "-rlF", needle, srcs[0]], capture_output=True, text=True).stdout
        return None if found else f"{crate} {version} does not read {name}"
    # Downloaded (cargo fetch) but never unpacked by a build: read the archive.
    crates = glob.glob(os.path.join(home, "registry", "cache", "*", f"{crate}-{version}.crate"))
    if not crates:
        return f"{crate} {version} is not in the cargo registry (run `cargo fetch --locked` first)"
    with tarfile.open(crates[0]) as t:
        for m in t.getmembers():
            if m.isfile() and m.name.endswith(".rs") and needle.encode() in t.extractfile(m).read():
                return None
    return f"{crate} {version} does not read {name}"


def default_port(repo, svc):
    m = re.search(r"pub const DEFAULT_PORT: u16 = (\d+);", read(os.path.join(repo, "services", svc, "src", "config.rs")))
    return int(m.group(1)) if m else None


def health_names(repo):
    text = read(os.path.join(repo, "libs", "runtime", "src", "health.rs"))
    return set(re.findall(r'pub const (?:LIVENESS|READINESS): &str = "([^"]*)";', text))


def domains_sent(repo):
    """service -> (env key overriding the domain, default domain, descriptor keys sent)."""
    out = {}
    for svc in SERVICES:
        src = os.path.join(repo, "services", svc, "src")
        config = read(os.path.join(src, "config.rs"))
        m = re.search(r'ratelimit_domain: "([^"]+)"\.to_owned\(\)', config)
        if not m:
            continue
        key = re.search(r'pub const RATELIMIT_DOMAIN: &str = "([A-Z_]+)";', config)
        keys = set()
        for rs in glob.glob(os.path.join(src, "*.rs")):
            for line in without_tests(read(rs)).splitlines():
                if "descriptor(" in line and not line.lstrip().startswith(("fn ", "//")):
                    keys |= set(re.findall(r'"([a-z_]+)"', line))
        out[svc] = (key.group(1) if key else None, m.group(1), keys)
    return out


# ------------------------------------------------------------------ deploy facts
def k8s_containers(docs):
    """(where, binary, container, pod spec) of every mesh container (initContainers included)."""
    for d in docs:
        kind = d["kind"]
        if kind == "Deployment":
            pod = d["spec"]["template"]["spec"]
        elif kind == "CronJob":
            pod = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        else:
            continue
        for what, c in [("initContainer", c) for c in pod.get("initContainers", [])] + [
                ("container", c) for c in pod["containers"]]:
            binary = os.path.basename((c.get("command") or [""])[0])
            yield f"{kind} {d['metadata']['name']} {what} {c['name']}", binary, c, pod


def k8s_env(docs, c):
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    env = {}
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef", {}).get("name")
        env.update(cms.get(ref, {}).get("data", {}))
    for e in c.get("env", []):
        env[e["name"]] = e.get("value")
    return env


def compose_services(doc):
    """(name, binary, service) of every mesh service compose builds."""
    for name, svc in doc["services"].items():
        target = svc.get("build", {}).get("target") if isinstance(svc.get("build"), dict) else None
        if target in SERVICES:
            yield name, f"mesh-{target}", svc


# ------------------------------------------------------------------ checks
def check_env(repo, k8s, doc):
    cache = {}

    def check(where, binary, env, raw_values):
        if binary not in cache:
            cache[binary] = names_read(repo, binary)
        for name in env:
            if name in cache[binary]:
                continue
            if name in THIRD_PARTY:
                why = third_party_reads(repo, name)
                if why:
                    err(f"{where}: {name}: {why}")
                continue
            # Set only to be expanded into another variable, e.g. $(POD_NAME).
            if any(f"$({name})" in (v or "") for v in raw_values):
                continue
            err(f"{where}: sets {name}, which {binary} never reads")

    for overlay, docs in k8s.items():
        for where, binary, c, _ in k8s_containers(docs):
            if binary not in {f"mesh-{s}" for s in SERVICES}:
                err(f"{overlay}: {where}: command {binary!r} is not a mesh binary")
                continue
            env = k8s_env(docs, c)
            check(f"{overlay}: {where}", binary, env, env.values())
    for name, binary, svc in compose_services(doc):
        env = {k: (None if v is None else str(v)) for k, v in (svc.get("environment") or {}).items()}
        check(f"compose: {name}", binary, env, env.values())


def check_ports(repo, k8s, doc):
    ports = {f"mesh-{s}": default_port(repo, s) for s in SERVICES}
    for overlay, docs in k8s.items():
        for where, binary, c, _ in k8s_containers(docs):
            if not c.get("ports"):
                continue  # a job, not a server
            want = {"grpc": ports.get(binary), "metrics": (ports.get(binary) or 0) + 1000}
            have = {p.get("name"): p["containerPort"] for p in c["ports"]}
            if have != want:
                err(f"{overlay}: {where}: ports {have}, but {binary} listens on {want} by default")
        for d in docs:
            if d["kind"] != "Service":
                continue
            app = d["spec"].get("selector", {}).get("app.kubernetes.io/name", "")
            for p in d["spec"]["ports"]:
                want = ports.get(app, 0) + (1000 if p["name"] == "metrics" else 0)
                if p["port"] != want:
                    err(f"{overlay}: Service {d['metadata']['name']} port {p['name']} is {p['port']}, not {want}")
    for name, binary, svc in compose_services(doc):
        env = svc.get("environment") or {}
        grpc = ports[binary]
        published = {str(p).rsplit(":", 2)[-1] for p in svc.get("ports", [])}
        for var, port in (("MESH_LISTEN_ADDR", grpc), ("MESH_METRICS_ADDR", grpc + 1000)):
            if not str(env.get(var, "")).endswith(f":{port}"):
                err(f"compose: {name}: {var} is {env.get(var)!r}, not port {port}")
            if str(port) not in published:
                err(f"compose: {name}: port {port} is not published")


def check_probes(repo, k8s, doc):
    names = health_names(repo)
    if len(names) != 2:
        err(f"libs/runtime/src/health.rs: expected the LIVENESS and READINESS names, found {names}")
    for overlay, docs in k8s.items():
        for where, _, c, _ in k8s_containers(docs):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                g = c.get(probe, {}).get("grpc")
                if g is not None and g.get("service") not in names:
                    err(f"{overlay}: {where}: {probe} asks for {g.get('service')!r}, not a health name ({sorted(names)})")
    for name, _, svc in compose_services(doc):
        test = " ".join(svc.get("healthcheck", {}).get("test", []))
        asked = re.findall(r"-service=(\S*)", test)
        if not asked or any(a not in names for a in asked):
            err(f"compose: {name}: healthcheck asks for {asked}, not a health name ({sorted(names)})")


def rules_docs(text, where):
    try:
        return [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as e:
        err(f"{where}: not YAML: {e}")
        return []


def descriptor_keys(descriptors):
    keys = set()
    for d in descriptors or []:
        keys.add(d.get("key"))
        keys |= descriptor_keys(d.get("descriptors"))
    return keys


def rules_files(path):
    if os.path.isdir(path):
        return sorted(p for p in glob.glob(os.path.join(path, "**", "*.y*ml"), recursive=True)
                      if not os.path.basename(p).startswith("."))
    return [path]


def check_rules(repo, k8s, doc):
    sent = domains_sent(repo)
    if set(sent) != {"session", "data"}:
        err(f"services that send rate-limit Checks: found {sorted(sent)}, expected session and data "
            "(update this check if that changed)")
    sets = {}  # name -> (rules docs, env per service setting the domain)
    for overlay, docs in k8s.items():
        rules = []
        for d in docs:
            if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("mesh-ratelimit-rules"):
                for key, text in d.get("data", {}).items():
                    rules += rules_docs(text, f"{overlay}: ConfigMap {d['metadata']['name']}/{key}")
        envs = {}
        for where, binary, c, pod in k8s_containers(docs):
            envs[binary.removeprefix("mesh-")] = env = k8s_env(docs, c)
            if binary != "mesh-ratelimit":
                continue
            # The rules it reads must be the ConfigMap's, mounted as a directory.
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            target = env.get("MESH_RATELIMIT_RULES") or ""
            mounted = [m for m in c.get("volumeMounts", [])
                       if volumes.get(m["name"], {}).get("configMap", {}).get("name", "").startswith("mesh-ratelimit-rules")
                       and (target + "/").startswith(m["mountPath"].rstrip("/") + "/") and not m.get("subPath")]
            if not mounted:
                err(f"{overlay}: {where}: MESH_RATELIMIT_RULES {target!r} is not in a directory mount "
                    "of the mesh-ratelimit-rules ConfigMap")
        sets[f"k8s {overlay}"] = (rules, envs)
    # compose: the host directory mounted where MESH_RATELIMIT_RULES points.
    envs, rules = {}, []
    for name, binary, svc in compose_services(doc):
        env = svc.get("environment") or {}
        envs[binary.removeprefix("mesh-")] = env
        target = env.get("MESH_RATELIMIT_RULES")
        if binary == "mesh-ratelimit":
            for vol in svc.get("volumes", []):
                host, _, inside = str(vol).partition(":")
                inside = inside.split(":")[0]
                if target and (target == inside or target.startswith(inside.rstrip("/") + "/")):
                    root = os.path.realpath(os.path.join(repo, host))
                    path = os.path.join(repo, host, os.path.relpath(target, inside))
                    for f in rules_files(os.path.normpath(path)):
                        # A symlink out of the mounted directory dangles in the container.
                        if not os.path.realpath(f).startswith(root + os.sep):
                            err(f"compose: {name}: {f} links outside the mounted {host}: not there in the container")
                            continue
                        rules += rules_docs(read(f), f"compose: {f}")
            if not rules:
                err(f"compose: {name}: MESH_RATELIMIT_RULES {target!r} is not in a mounted repository path")
    sets["compose"] = (rules, envs)
    # local: the file up.sh exports.
    m = re.search(r'MESH_RATELIMIT_RULES="\$MESH_REPO/([^"]+)"', read(os.path.join(repo, "deploy/local/up.sh")))
    rules = []
    if m:
        for f in rules_files(os.path.join(repo, m.group(1))):
            rules += rules_docs(read(f), f"local: {f}")
    else:
        err("deploy/local/up.sh: cannot find the MESH_RATELIMIT_RULES it exports")
    sets["local (deploy/local/up.sh)"] = (rules, {})

    for set_name, (rules, envs) in sets.items():
        by_domain = {}
        for r in rules:
            if isinstance(r, dict) and r.get("domain"):
                if r["domain"] in by_domain:
                    err(f"{set_name}: domain {r['domain']} defined twice")
                by_domain[r["domain"]] = r
        for svc, (var, default, keys) in sent.items():
            domain = (envs.get(svc) or {}).get(var) or default
            if domain not in by_domain:
                err(f"{set_name}: no rules for domain {domain!r}, which mesh-{svc} sends its Checks to "
                    "(an unknown domain is allowed without limit)")
                continue
            missing = keys - descriptor_keys(by_domain[domain].get("descriptors"))
            if missing:
                err(f"{set_name}: domain {domain!r} has no descriptor for key(s) {sorted(missing)} "
                    f"that mesh-{svc} sends")


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def anchors(md):
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens."""
    out, in_code = set(), False
    for line in read(md).splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def check_links(repo):
    files = subprocess.run(["git", "-C", repo, "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
                           capture_output=True, text=True, check=True).stdout.split()
    for md in files:
        path = os.path.join(repo, md)
        if not os.path.exists(path):
            continue
        text = read(path)
        if "../shared" in text:
            err(f"{md}: refers to ../shared, which is outside the repository")
        in_code = False
        for n, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            if in_code:
                continue
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue
                target, _, anchor = target.partition("#")
                resolved = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
                if not resolved.startswith(os.path.abspath(repo)) or not os.path.exists(resolved):
                    err(f"{md}:{n}: link {target} does not resolve inside the repository")
                elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
                    err(f"{md}:{n}: link {target}#{anchor}: no such heading")


def main():
    check, repo, *args = sys.argv[1:]
    repo = os.path.abspath(repo)
    if check == "links":
        check_links(repo)
    else:
        {"env": check_env, "ports": check_ports, "probes": check_probes, "rules": check_rules}[check](
            repo, rendered(args), compose(repo))
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
