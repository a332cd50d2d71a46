#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/ offline and strictly:
#
#   * every object file (*.yaml except kustomization.yaml) against the
#     Kubernetes OpenAPI schemas bundled with kubernetes-validate, in --strict
#     mode (unknown fields are errors), for the newest Kubernetes version the
#     installed kubernetes-validate bundles (at least 1.30) and for 1.30, the
#     oldest version these manifests target;
#   * every object is one the schemas know (an unknown kind or apiVersion is an
#     error here, not the tool's warning), and none sets a namespace;
#   * kustomization.yaml lists files that exist, and lists every object file;
#   * a canary: a copy of deployment.yaml with a misspelled field must fail, so
#     that a validator that checks nothing cannot pass.
#
# Needs python3. Unless kubernetes-validate is already installed, it is
# installed from PyPI into a virtual environment of this script's own under
# ${XDG_CACHE_HOME:-~/.cache}/keystile-validate, never into the machine's
# Python.
#
# Environment:
#   KUBERNETES_VALIDATE_SPEC  pip requirement to install (default below)
#   KUBERNETES_VERSIONS       space-separated versions to validate against
#                             (default: the newest bundled, and 1.30.0)
set -euo pipefail

KUBERNETES_VALIDATE_SPEC="${KUBERNETES_VALIDATE_SPEC:-kubernetes-validate==1.37.0}"
MIN_VERSION="1.30.0"

cd "$(dirname "$0")"

die() { echo "validate.sh: $*" >&2; exit 1; }

command -v python3 >/dev/null 2>&1 || die "python3 is required"

# --- find or install kubernetes-validate ------------------------------------
# PY is an interpreter that can import kubernetes_validate (and so PyYAML).
PY=""
imports_kv() { "$1" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; }

if imports_kv python3; then
  PY="python3"
elif command -v kubernetes-validate >/dev/null 2>&1; then
  # e.g. installed with pipx: use the interpreter of its entry point.
  shebang="$(head -n 1 "$(command -v kubernetes-validate)" | sed -n 's|^#![[:space:]]*||p')"
  if [ -n "$shebang" ] && [ -x "${shebang%% *}" ] && imports_kv "${shebang%% *}"; then
    PY="${shebang%% *}"
  fi
fi

if [ -z "$PY" ]; then
  # A virtual environment of our own: nothing is installed into the
  # machine's Python.
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/keystile-validate"
  if ! imports_kv "$venv/bin/python" 2>/dev/null; then
    echo "installing $KUBERNETES_VALIDATE_SPEC into $venv"
    rm -rf "$venv"
    if python3 -m venv "$venv" >/dev/null 2>&1; then
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE_SPEC"
    else
      # No ensurepip (python3-venv not installed): a bare venv, filled by
      # the system pip.
      rm -rf "$venv"
      python3 -m venv --without-pip "$venv"
      python3 -m pip --python "$venv/bin/python" install --quiet --disable-pip-version-check \
        "$KUBERNETES_VALIDATE_SPEC"
    fi
  fi
  PY="$venv/bin/python"
  imports_kv "$PY" || die "kubernetes-validate was installed but $PY cannot import it"
fi

KV=("$PY" -m kubernetes_validate)
echo "kubernetes-validate $("${KV[@]}" --version) ($PY)"

# --- Kubernetes versions -----------------------------------------------------
newest="$("$PY" -c 'from kubernetes_validate.utils import latest_version; print(latest_version())')"
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }
version_ge "$newest" "$MIN_VERSION" \
  || die "kubernetes-validate bundles Kubernetes up to $newest; $MIN_VERSION or newer is needed (upgrade it: pip install -U kubernetes-validate)"
read -r -a versions <<<"${KUBERNETES_VERSIONS:-$newest $MIN_VERSION}"
echo "Kubernetes versions: ${versions[*]}"

# --- the object files ---------------------------------------------------------
files=()
for f in *.yaml *.yml; do
  [ -e "$f" ] || continue
  case "$f" in kustomization.yaml | kustomization.yml) continue ;; esac
  files+=("$f")
done
[ "${#files[@]}" -gt 0 ] || die "no manifests found in $(pwd)"

k_args=()
for v in "${versions[@]}"; do k_args+=(-k "$v"); done

# Runs kubernetes-validate --strict; passes only if it exits 0, every line it
# prints is an INFO "passed" line (it only warns, exit 0, about a kind or
# apiVersion it has no schema for), and every document of every file passed
# for every version.
strict_validate() {
  local out rc=0 expected passed
  out="$("${KV[@]}" --strict "${k_args[@]}" "$@" 2>&1)" || rc=$?
  printf '%s\n' "$out"
  [ "$rc" -eq 0 ] || { echo "kubernetes-validate exited $rc" >&2; return 1; }
  if grep -qv '^INFO .* passed for resource ' <<<"$out"; then
    echo "kubernetes-validate printed warnings or errors" >&2
    return 1
  fi
  expected="$("$PY" - "${#versions[@]}" "$@" <<'EOF'
import sys, yaml
n = 0
for name in sys.argv[2:]:
    with open(name) as f:
        n += sum(1 for doc in yaml.safe_load_all(f) if doc)
print(n * int(sys.argv[1]))
EOF
)"
  passed="$(grep -c '^INFO .* passed for resource ' <<<"$out" || true)"
  if [ "$passed" != "$expected" ]; then
    echo "expected $expected passed validations, got $passed" >&2
    return 1
  fi
}

echo "== kubernetes-validate --strict ${k_args[*]}"
strict_validate "${files[@]}" || die "manifest validation failed"

# --- kustomization.yaml and manifest-wide rules ------------------------------
echo "== kustomization.yaml and manifest rules"
"$PY" - "${files[@]}" <<'EOF' || die "kustomization or manifest check failed"
import os, sys, yaml

errors = []
with open("kustomization.yaml") as f:
    k = yaml.safe_load(f)
if not isinstance(k, dict):
    sys.exit("kustomization.yaml: not a mapping")
if k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or k.get("kind") != "Kustomization":
    errors.append("kustomization.yaml: expected apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization")
resources = k.get("resources") or []
if not resources:
    errors.append("kustomization.yaml: no resources")
for r in resources:
    if not isinstance(r, str):
        errors.append(f"kustomization.yaml: resource {r!r} is not a path")
    elif not os.path.isfile(r):
        errors.append(f"kustomization.yaml: {r} does not exist")
dupes = sorted({r for r in resources if resources.count(r) > 1})
if dupes:
    errors.append(f"kustomization.yaml: listed more than once: {', '.join(map(str, dupes))}")
for name in sys.argv[1:]:
    if name not in resources:
        errors.append(f"kustomization.yaml: does not list {name}")

seen = {}
for name in sys.argv[1:]:
    with open(name) as f:
        for doc in yaml.safe_load_all(f):
            if not doc:
                continue
            meta = doc.get("metadata") or {}
            ref = f"{name}: {doc.get('kind')}/{meta.get('name')}"
            if "namespace" in meta:
                errors.append(f"{ref}: sets metadata.namespace (manifests are namespace-free)")
            key = (doc.get("apiVersion"), doc.get("kind"), meta.get("name"))
            if key in seen:
                errors.append(f"{ref}: also defined in {seen[key]}")
            seen[key] = name

for e in errors:
    print("ERROR", e)
if errors:
    sys.exit(1)
print(f"OK kustomization.yaml lists {len(resources)} files, all present; "
      f"{len(seen)} objects, none namespaced")
EOF

# --- the Sentinel overlay ----------------------------------------------------
# Its new objects are validated like the base's; its patches (*.patch.yaml)
# are partial objects that kustomize merges into the base, so only their
# files and names are checked: each must patch an object of the base.
echo "== sentinel/ overlay"
(
  cd sentinel
  overlay_objects=()
  for f in *.yaml; do
    case "$f" in kustomization.yaml | *.patch.yaml) continue ;; esac
    overlay_objects+=("$f")
  done
  strict_validate "${overlay_objects[@]}" || die "sentinel overlay: validation failed"
  "$PY" - "${overlay_objects[@]}" <<'EOF2' || die "sentinel overlay: kustomization check failed"
import glob, os, sys, yaml
errors = []
with open("kustomization.yaml") as f:
    k = yaml.safe_load(f)
resources = k.get("resources") or []
for r in resources:
    if r != "../" and not os.path.isfile(r):
        errors.append(f"sentinel/kustomization.yaml: {r} does not exist")
for name in sys.argv[1:]:
    if name not in resources:
        errors.append(f"sentinel/kustomization.yaml: does not list {name}")
patches = [p.get("path") for p in (k.get("patches") or [])]
base = set()
for name in glob.glob("../*.yaml"):
    if name.endswith("kustomization.yaml"):
        continue
    with open(name) as f:
        for doc in yaml.safe_load_all(f):
            if doc:
                base.add((doc.get("kind"), (doc.get("metadata") or {}).get("name")))
for name in glob.glob("*.patch.yaml"):
    if name not in patches:
        errors.append(f"sentinel/kustomization.yaml: does not apply {name}")
    with open(name) as f:
        for doc in yaml.safe_load_all(f):
            if doc and (doc.get("kind"), doc["metadata"]["name"]) not in base:
                errors.append(f"sentinel/{name}: patches {doc.get('kind')}/{doc['metadata']['name']}, not in the base")
for p in patches:
    if not os.path.isfile(p):
        errors.append(f"sentinel/kustomization.yaml: patch {p} does not exist")
for e in errors:
    print("ERROR", e)
sys.exit(1 if errors else 0)
EOF2
  echo "OK sentinel/: ${#overlay_objects[@]} object file(s) valid, patches target the base"
)

# --- the Istio overlay ---------------------------------------------------------
# Istio's objects are custom resources the bundled schemas do not know: each
# is checked for the kind, apiVersion and fields keystile relies on (the
# ServiceEntry to the in-pod sidecar, a CUSTOM AuthorizationPolicy naming
# the provider, the provider itself failing closed), and the kustomization
# like the Sentinel one's.
echo "== istio/ overlay"
(
  cd istio
  "$PY" - <<'EOF3' || die "istio overlay: check failed"
import glob, os, sys, yaml
errors = []
def load(name):
    with open(name) as f:
        return [d for d in yaml.safe_load_all(f) if d]
k = load("kustomization.yaml")[0]
resources = k.get("resources") or []
for r in resources:
    if r != "../" and not os.path.isfile(r):
        errors.append(f"istio/kustomization.yaml: {r} does not exist")
for p in (x.get("path") for x in k.get("patches") or []):
    if not os.path.isfile(p):
        errors.append(f"istio/kustomization.yaml: patch {p} does not exist")
expect = {
    "serviceentry.yaml": ("networking.istio.io/v1", "ServiceEntry"),
    "authorizationpolicy.yaml": ("security.istio.io/v1", "AuthorizationPolicy"),
}
for name, (api, kind) in expect.items():
    if name not in resources:
        errors.append(f"istio/kustomization.yaml: does not list {name}")
    (doc,) = load(name)
    if (doc.get("apiVersion"), doc.get("kind")) != (api, kind):
        errors.append(f"istio/{name}: expected {api} {kind}")
    if "namespace" in (doc.get("metadata") or {}):
        errors.append(f"istio/{name}: sets a namespace")
se = load("serviceentry.yaml")[0]["spec"]
if se.get("hosts") != ["keystile.local"] or se.get("resolution") != "STATIC" \
        or [e.get("address") for e in se.get("endpoints", [])] != ["127.0.0.1"] \
        or [p.get("number") for p in se.get("ports", [])] != [50051]:
    errors.append("istio/serviceentry.yaml: keystile.local must resolve STATIC to 127.0.0.1:50051")
ap = load("authorizationpolicy.yaml")[0]["spec"]
if ap.get("action") != "CUSTOM" or (ap.get("provider") or {}).get("name") != "keystile":
    errors.append("istio/authorizationpolicy.yaml: action CUSTOM with provider keystile")
mesh = load("meshconfig.yaml")[0]
providers = {p["name"]: p for p in mesh["spec"]["meshConfig"]["extensionProviders"]}
grpc = (providers.get("keystile") or {}).get("envoyExtAuthzGrpc") or {}
if (grpc.get("service"), grpc.get("port"), grpc.get("failOpen"), grpc.get("timeout")) != ("keystile.local", 50051, False, "0.5s"):
    errors.append("istio/meshconfig.yaml: provider keystile: envoyExtAuthzGrpc keystile.local:50051, timeout 0.5s, failOpen false")
patch = load("configmap.patch.yaml")[0]
if (patch.get("kind"), patch["metadata"]["name"], patch["data"].get("KEYSTILE_EXT_AUTHZ")) != ("ConfigMap", "keystile-config", "true"):
    errors.append("istio/configmap.patch.yaml: must turn KEYSTILE_EXT_AUTHZ on in keystile-config")
for e in errors:
    print("ERROR", e)
sys.exit(1 if errors else 0)
EOF3
  echo "OK istio/: ServiceEntry, AuthorizationPolicy, provider and patch as keystile needs them"
)

# --- canary: strict mode must reject an unknown field -----------------------
echo "== canary: a misspelled field must be rejected"
canary_dir="$(mktemp -d)"
trap 'rm -rf "$canary_dir"' EXIT
"$PY" - deployment.yaml "$canary_dir/deployment-typo.yaml" <<'EOF'
import sys, yaml
with open(sys.argv[1]) as f:
    doc = yaml.safe_load(f)
c = doc["spec"]["template"]["spec"]["containers"][0]
c["imagePullPolicyy"] = c.pop("imagePullPolicy", "IfNotPresent")
with open(sys.argv[2], "w") as f:
    yaml.safe_dump(doc, f)
EOF
if strict_validate "$canary_dir/deployment-typo.yaml" >"$canary_dir/out" 2>&1; then
  cat "$canary_dir/out"
  die "canary: a manifest with a misspelled field passed validation"
fi
grep -m 1 'imagePullPolicyy' "$canary_dir/out" || die "canary: failed, but not on the misspelled field"

echo "OK: ${#files[@]} manifest files valid for Kubernetes ${versions[*]} (strict)"
