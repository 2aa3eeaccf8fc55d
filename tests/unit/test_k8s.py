"""deploy/k8s/: the Kubernetes manifests validate against the API's schemas, and agree with the gateway and image.
The Secrets' shapes are in deploy/k8s/secrets/, out of what `kubectl apply -f deploy/k8s/` applies.

The schemas come with the PyPI package kubernetes-validate (no cluster, no network): every document is
checked strictly (an unknown field is an error) against the oldest Kubernetes release still supported
upstream that we name here, and the newest the package knows. The rest cross-checks what a schema cannot:
the configuration in the ConfigMap loads (only the files it names are missing here), the probes ask the
admin listener it configures, the mounts hold the files it names, and the pods run as the image's user.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy import config
from proxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
VERSIONS = ("1.31.0", kubernetes_validate.utils.latest_version())


def _documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*/*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str) -> dict[str, Any]:
    (found,) = [d for d in _documents() if d["kind"] == kind and d["metadata"]["name"] == "kcd-proxy"]
    return found


def _container() -> dict[str, Any]:
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def _gateway_config(tmp_path: Path) -> tuple[str, dict[str, Any]]:
    text = str(_one("ConfigMap")["data"]["kcd-proxy.toml"])
    return text, tomllib.loads(text)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    """Deployment, Service, PodDisruptionBudget, NetworkPolicy, ConfigMap and Secrets pass the API schema, unknown
    fields refused."""
    docs = _documents()
    kinds = {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap", "Secret"}
    assert {d["kind"] for d in docs} == kinds
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")


def test_the_validation_catches_a_mistake() -> None:
    """The check is not a formality: a misspelt probe field is refused."""
    deployment = _one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_configuration_loads_but_for_the_files_it_names(tmp_path: Path) -> None:
    """The ConfigMap's kcd-proxy.toml has no unknown key nor bad value: loading it fails on missing files only (and
    the state directory the pod's init container makes)."""
    text, data = _gateway_config(tmp_path)
    path = tmp_path / "kcd-proxy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert e.value.problems
    state = (
        f"client_certificates.crl_state: directory not found: {Path(data['client_certificates']['crl_state']).parent}"
    )
    missing = [p for p in e.value.problems if not p.startswith(state)]
    assert len(missing) == len(e.value.problems) - 1, e.value.problems
    assert all("file not found" in p for p in missing), e.value.problems


def test_the_mounts_hold_the_files_the_configuration_names(tmp_path: Path) -> None:
    """Every path in the configuration lies under a mount, with a key of that name in its ConfigMap or Secret."""
    text, _ = _gateway_config(tmp_path)
    container = _container()
    volumes = {v["name"]: v for v in _one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    keys = {d["metadata"]["name"]: set(d.get("data", {})) for d in _documents() if d["kind"] in ("ConfigMap", "Secret")}
    for path in re.findall(r'= "(/etc/kcd-proxy/[^"]+)"', text) + re.findall(r'"(/etc/kcd-proxy/[^"]+)"\]', text):
        mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volume = volumes[mount["name"]]
        source = volume.get("configMap", {}).get("name") or volume["secret"]["secretName"]
        assert Path(path).name in keys[source], f"{path}: no key {Path(path).name} in {source}"
    assert container["args"][-1] == "/etc/kcd-proxy/config/kcd-proxy.toml"


def test_ports_and_probes_match_the_configuration(tmp_path: Path) -> None:
    """The container port is the listener's; both probes ask the admin listener the configuration binds."""
    _, data = _gateway_config(tmp_path)
    container = _container()
    assert container["ports"][0]["containerPort"] == int(data["listener"]["bind"].rpartition(":")[2])
    admin = data["admin"]["bind"]
    assert admin.startswith("127.0.0.1:")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert f"http://{admin}{path}" in container[probe]["exec"]["command"][-1]
    service = _one("Service")
    assert service["spec"]["selector"] == _one("Deployment")["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_pods_run_as_the_images_user_without_privileges() -> None:
    """uid/gid 10001 as in the image, no privilege escalation, no capabilities, read-only root."""
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (10001, 10001)
    dockerfile = (REPO / "deploy" / "gateway" / "Dockerfile").read_text()
    assert "--uid 10001 --gid 10001" in dockerfile
    security = _container()["securityContext"]
    assert security == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_applying_the_directory_never_overwrites_the_secrets() -> None:
    """`kubectl apply -f deploy/k8s/` (not recursive) carries no Secret: the shapes shown with empty values replaced
    the keytab and TLS key an operator had made with `kubectl create secret` by empty ones (apply patches `data`)."""
    applied = [d for path in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    assert [d["metadata"]["name"] for d in applied if d["kind"] == "Secret"] == []
    shapes = [d for d in _documents() if d["kind"] == "Secret"]
    assert {d["metadata"]["name"] for d in shapes} == {"kcd-proxy-keytab", "kcd-proxy-tls"}


def test_a_network_policy_lets_in_the_device_port_alone() -> None:
    """The pods take connections on the https port only: the admin listener (loopback here, but a `bind` moved to
    0.0.0.0 for a scraper) and anything else a pod opens stay unreachable from the cluster."""
    policy = _one("NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == _one("Deployment")["spec"]["selector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert "from" not in rule  # devices come from anywhere
    assert rule["ports"] == [{"protocol": "TCP", "port": _container()["ports"][0]["name"]}]


def _mount_of(path: str, container: dict[str, Any]) -> dict[str, Any]:
    """The container's volume mount that `path` lies under."""
    return next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))


def test_the_crl_floors_are_kept_in_a_directory_of_the_gateways_user_on_a_writable_volume(tmp_path: Path) -> None:
    """`client_certificates.crl_state` is set (a restarted container forgot its CRL floors: nothing set it), in a
    directory on a writable emptyDir that an init container of the same image, as the pod's user, makes 0700: the
    volume itself, group-writable under fsGroup (kubelet makes it 2777), is refused by the gateway. Both run here:
    the init container's command on a directory made as kubelet makes it, then check-config's test of the state
    file's directory, which passes for the one made and refuses the volume's own root."""
    from proxy.ops.check import crl_state

    _, data = _gateway_config(tmp_path)
    state = data["client_certificates"]["crl_state"]
    pod = _one("Deployment")["spec"]["template"]["spec"]
    container = _container()
    mount = _mount_of(state, container)
    assert not mount.get("readOnly", False), mount
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume, volume  # survives the container's restart (not the pod's: docs/revocation.md)
    assert "fsGroup" in pod["securityContext"]

    (init,) = pod["initContainers"]
    assert init["image"] == container["image"]
    assert init["securityContext"] == container["securityContext"]
    assert _mount_of(state, init) == {"name": mount["name"], "mountPath": mount["mountPath"]}
    directory = str(Path(state).parent)
    assert init["command"] == ["mkdir", "-p", "-m", "0700", directory]

    volume_root = tmp_path / "volume"
    volume_root.mkdir()
    volume_root.chmod(0o2777)  # an emptyDir under fsGroup
    local = volume_root / Path(directory).relative_to(mount["mountPath"])
    subprocess.run([*init["command"][:-1], str(local)], check=True)
    assert list(crl_state(local / Path(state).name)) == []
    (refused,) = crl_state(volume_root / Path(state).name)
    assert "writable by others" in refused, refused


def test_a_stopping_pod_waits_for_its_endpoint_to_go_then_drains_within_the_grace_period(tmp_path: Path) -> None:
    """preStop sleeps about 5 s before the SIGTERM that closes the listener (kube-proxy, the Service's endpoints and
    an outside balancer learn of the pod's end in that time, not before it), and terminationGracePeriodSeconds covers
    that sleep, the gateway's `[listener] drain_timeout` (the ConfigMap's, else the loader's default) and 5 s more for
    the exit: past it the kubelet sends SIGKILL into the drain."""
    from proxy.config import Listener

    _, data = _gateway_config(tmp_path)
    drain = float(data.get("listener", {}).get("drain_timeout", Listener.__dataclass_fields__["drain_timeout"].default))
    pod = _one("Deployment")["spec"]["template"]["spec"]
    hook = _container()["lifecycle"]["preStop"]
    assert list(hook) == ["sleep"], hook  # the kubelet's own sleep: nothing needs to be in the image
    pause = hook["sleep"]["seconds"]
    assert 3 <= pause <= 10, pause
    assert pod["terminationGracePeriodSeconds"] >= pause + drain + 5, (pod["terminationGracePeriodSeconds"], drain)
