"""The bench's scene, built from nothing in a temporary directory and torn down afterwards.

    lab          slapd + MIT KDC (LDAP back end), PKI, Exchange stand-in: proxy.lab.runner.up
    users        N more principals (kadmin.local) with client certificates from the lab's issuing CA
    backend      nginx serving a 1 KiB file; it answers 401 to a request without `Authorization: Negotiate`
    holdback     bench.holdback: holds each request X-Lab-Hold-Seconds (long-polls)
    nginx        the reference: TLS with a verified client certificate (and the lab CRLs), one worker,
                 keep-alive to the backends; it adds a fixed `Authorization: Negotiate` header of a real
                 token's size, since it cannot delegate
    gateway      `kcd-proxy run` with the lab's configuration and the defaults (CRLs from the lab PKI, the
                 JSON summary line on stdout into a file, metrics, traces), one worker; routes "/" -> backend,
                 "/bound/" -> backend with backend_binding = "connection", "/hold/" -> holdback,
                 "/lab/" -> the lab's real Negotiate acceptor (the preflight proves delegation works)
    plain        bench.plain: a plain aiohttp reverse proxy (TLS with a verified client certificate and the
                 lab CRLs, one pooled ClientSession, a fixed Authorization header), the framework's own cost

The asymmetry, on purpose: the static backend checks that a Negotiate header is there but not the ticket
in it. The lab's Python acceptor verifies tickets, at a few thousand requests per second: in the keep-alive
runs it would measure itself, not the proxies. The preflight request through "/lab/" shows the gateway's
tokens are real; the test suite shows the rest.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from proxy.identity.upn import upn_other_name
from proxy.lab import runner
from proxy.lab.layout import LabLayout

REPO = Path(__file__).resolve().parents[1]
TOKEN_SIZE = 917  # bytes of the SPNEGO token the gateway sends for a lab user (base64: 1,224 characters)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} does not listen on 127.0.0.1:{port} after {timeout:g} s")


@dataclass
class Scene:
    root: Path
    cores: tuple[str, str]  # (taskset list for the proxies under test, for load generators and backends)
    workers: int = 1  # processes of each proxy
    layout: LabLayout = field(init=False)
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    users: list[tuple[str, Path, Path]] = field(default_factory=list)  # (principal, cert, key)
    # what the gateways run under (bench.instructions: valgrind's callgrind) and how long one may take to listen
    wrap: list[str] = field(default_factory=list)
    listen_timeout: float = 30

    def __post_init__(self) -> None:
        ports = {name: free_port() for name in ("ldap", "kdc", "lab_backend", "crl", "lab_gateway")}
        self.layout = LabLayout(
            root=self.root / "lab",
            ldap_port=ports["ldap"],
            kdc_port=ports["kdc"],
            backend_port=ports["lab_backend"],
            crl_port=ports["crl"],
            gateway_port=ports["lab_gateway"],
        )
        self.ports = {name: free_port() for name in ("backend", "holdback", "nginx", "gateway", "plain")}

    # -- building -----------------------------------------------------------------------------------

    def build(self, n_users: int) -> None:
        self.root.chmod(0o755)  # nginx's workers run as nobody and serve a file from here
        runner.up(self.layout)
        self._make_users(n_users)
        self._write_nginx_configs()
        self._write_gateway_config()

    def _make_users(self, n: int) -> None:
        names = [f"bench{i:04d}" for i in range(n)]
        commands = "".join(f"addprinc -randkey {name}\n" for name in names)
        subprocess.run(
            ["kadmin.local"],
            input=commands,
            capture_output=True,
            text=True,
            env={**os.environ, **self.layout.env()},
            check=True,
            timeout=300,
        )
        pki = self.layout.pki_dir
        ca_cert = x509.load_pem_x509_certificate((pki / "issuing.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((pki / "issuing.key").read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        out = self.root / "users"
        out.mkdir()
        now = datetime.now(UTC)
        # the extensions the lab's own user certificates carry (the gateway's defaults do not fetch them)
        crl_url = f"http://{self.layout.crl_host}:{self.layout.crl_port}/issuing.crl"
        crl_point = x509.CRLDistributionPoints(
            [x509.DistributionPoint([x509.UniformResourceIdentifier(crl_url)], None, None, None)]
        )
        ocsp_url = x509.UniformResourceIdentifier(f"http://{self.layout.crl_host}:{self.layout.ocsp_port}")
        ocsp = x509.AuthorityInformationAccess([x509.AccessDescription(AuthorityInformationAccessOID.OCSP, ocsp_url)])
        for name in names:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(hours=1))
                .not_valid_after(now + timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName([upn_other_name(f"{name}@lab.test")]), critical=False)
                .add_extension(crl_point, critical=False)
                .add_extension(ocsp, critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            key_path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            self.users.append((f"{name}@LAB.TEST", cert_path, key_path))

    def cert_list(self, count: int | None = None) -> Path:
        """A KCD_SHIM_CERTS file: the first `count` bench users (all by default), one "cert key" a line."""
        chosen = self.users if count is None else self.users[:count]
        path = self.root / f"certs-{len(chosen)}.txt"
        path.write_text("".join(f"{cert} {key}\n" for _, cert, key in chosen))
        return path

    def _write_nginx_configs(self) -> None:
        (self.root / "nginx").mkdir()
        (self.root / "nginx" / "1k.bin").write_bytes(bytes(range(256)) * 4)
        pki = self.layout.pki_dir
        (self.root / "nginx" / "clientca.pem").write_text(
            (pki / "root.pem").read_text() + (pki / "issuing.pem").read_text()
        )
        placeholder = "A" * (4 * ((TOKEN_SIZE + 2) // 3))
        # nginx counts client and upstream connections, and starts closing idle ones when fewer than a
        # sixteenth are free: let the file descriptor limit, not that, be what bounds it.
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        common = f"""daemon off;
worker_processes {{workers}};
worker_rlimit_nofile {nofile};
events {{ worker_connections {2 * nofile}; }}
"""
        http = f"""  client_body_temp_path {self.root}/nginx/tmp;
  proxy_temp_path {self.root}/nginx/tmp;
  fastcgi_temp_path {self.root}/nginx/tmp;
  uwsgi_temp_path {self.root}/nginx/tmp;
  scgi_temp_path {self.root}/nginx/tmp;
  keepalive_requests 1000000;
  large_client_header_buffers 4 64k;
"""
        backend = f"""{common}pid {self.root}/nginx/backend.pid;
error_log {self.root}/nginx/backend-error.log warn;
http {{
{http}  access_log off;
  server {{
    listen 127.0.0.1:{self.ports["backend"]} backlog=4096;
    location / {{
      if ($http_authorization !~ "^Negotiate ") {{ return 401; }}
      root {self.root}/nginx;
      default_type application/octet-stream;
      rewrite ^ /1k.bin break;
    }}
    # the gateway's connection-bound route: a token on a connection's first request only (not checked here)
    location /bound/ {{
      root {self.root}/nginx;
      default_type application/octet-stream;
      rewrite ^ /1k.bin break;
    }}
  }}
}}
"""
        # The reference logs each request too (buffered), as the gateway writes a summary line per request.
        front = f"""{common}pid {self.root}/nginx/front.pid;
error_log {self.root}/nginx/front-error.log warn;
http {{
{http}  access_log {self.root}/nginx/access.log combined buffer=64k flush=1s;
  upstream backend {{ server 127.0.0.1:{self.ports["backend"]}; keepalive 64; }}
  upstream holdback {{ server 127.0.0.1:{self.ports["holdback"]}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{self.ports["nginx"]} ssl backlog=4096;
    ssl_certificate {pki / "server-chain.pem"};
    ssl_certificate_key {pki / "server.key"};
    ssl_client_certificate {self.root}/nginx/clientca.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_verify_client on;
    ssl_verify_depth 3;
    ssl_crl {pki / "crls.pem"};
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Authorization "Negotiate {placeholder}";
    proxy_read_timeout 3600s;
    location / {{ proxy_pass http://backend; }}
    location /hold/ {{ proxy_pass http://holdback; }}
  }}
}}
"""
        (self.root / "nginx" / "tmp").mkdir()
        (self.root / "nginx" / "backend.conf").write_text(backend.replace("{workers}", "1"))
        (self.root / "nginx" / "front.conf").write_text(front.replace("{workers}", str(self.workers)))

    def _write_gateway_config(self) -> None:
        text = runner.gateway_config(self.layout, gateway_port=self.ports["gateway"])
        bind = f'bind = "{self.layout.bind_host}:{self.ports["gateway"]}"\n'
        text = text.replace(bind, f"{bind}workers = {self.workers}\n")
        lab_upstream = f'upstream = "http://{self.layout.backend_host}:{self.layout.backend_port}"'
        text = text.replace(lab_upstream, f'upstream = "http://127.0.0.1:{self.ports["backend"]}"')
        text += f"""
[[routes]]
prefix = "/hold/"
upstream = "http://127.0.0.1:{self.ports["holdback"]}"
spn = "HTTP/cas.lab.test"
read_timeout = 3600

[[routes]]
prefix = "/bound/"
upstream = "http://127.0.0.1:{self.ports["backend"]}"
spn = "HTTP/cas.lab.test"
backend_binding = "connection"

[[routes]]
prefix = "/lab/"
upstream = "http://{self.layout.backend_host}:{self.layout.backend_port}"
spn = "HTTP/cas.lab.test"
"""
        (self.root / "gateway.toml").write_text(text)

    # -- processes ----------------------------------------------------------------------------------

    def start(
        self,
        name: str,
        argv: list[str],
        port: int,
        *,
        core: str,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
        timeout: float = 30,
    ) -> None:
        log = (self.root / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            ["taskset", "-c", core, *argv] if core else argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs[name] = proc
        wait_port(port, proc, name, timeout)

    def start_backends(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = self.root / "nginx" / "backend.conf"
        self.start(
            "backend",
            [nginx, "-c", str(conf), "-p", str(self.root / "nginx")],
            self.ports["backend"],
            core=self.cores[1],
        )
        holdback = [sys.executable, "-m", "bench.holdback", "--port", str(self.ports["holdback"])]
        self.start("holdback", holdback, self.ports["holdback"], core=self.cores[1])

    def start_nginx(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = self.root / "nginx" / "front.conf"
        self.start(
            "nginx", [nginx, "-c", str(conf), "-p", str(self.root / "nginx")], self.ports["nginx"], core=self.cores[0]
        )

    def start_nginx_workers(self, name: str, workers: int, *, core: str) -> None:
        """The reference again on a port of its own with `workers` processes, each with a listening socket of its own
        (`reuseport`: the kernel spreads connections over them as over the gateway's workers; without it, one nginx
        worker took nearly every connection of wrk's 50 in this scene), its own pid file and access log."""
        self.ports[name] = port = free_port()
        text = (self.root / "nginx" / "front.conf").read_text()
        listen = f"listen 127.0.0.1:{self.ports['nginx']} ssl"
        assert listen in text, "the reference's listen line moved"
        assert f"worker_processes {self.workers};" in text, "the reference's worker_processes line moved"
        text = text.replace(listen, f"listen 127.0.0.1:{port} ssl reuseport", 1)
        text = text.replace(f"worker_processes {self.workers};", f"worker_processes {workers};", 1)
        text = text.replace("/nginx/front.pid", f"/nginx/{name}.pid")
        text = text.replace("/nginx/access.log", f"/nginx/{name}-access.log")
        conf = self.root / "nginx" / f"{name}.conf"
        conf.write_text(text)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.start(name, [nginx, "-c", str(conf), "-p", str(self.root / "nginx")], port, core=core)

    def start_plain(self) -> None:
        """The plain aiohttp reverse proxy (bench.plain): the same TLS and client certificate check as nginx."""
        pki = self.layout.pki_dir
        argv = [sys.executable, "-m", "bench.plain", "--port", str(self.ports["plain"])]
        argv += ["--upstream", f"http://127.0.0.1:{self.ports['backend']}"]
        argv += ["--cert", str(pki / "server-chain.pem"), "--key", str(pki / "server.key")]
        argv += ["--client-ca", str(self.root / "nginx" / "clientca.pem"), "--crl", str(pki / "crls.pem")]
        argv += ["--authorization", "Negotiate " + "A" * (4 * ((TOKEN_SIZE + 2) // 3))]
        self.start("plain", argv, self.ports["plain"], core=self.cores[0])

    def start_gateway(self) -> None:
        argv = [*self.wrap, sys.executable, "-m", "proxy", "run", "--config", str(self.root / "gateway.toml")]
        self.start(
            "gateway",
            argv,
            self.ports["gateway"],
            core=self.cores[0],
            env=self.layout.env(),
            timeout=self.listen_timeout,
        )

    def start_variant(
        self,
        name: str,
        *,
        core: str,
        event_loop: str = "uvloop",
        workers: int = 1,
        http_server: str = "own",
        session_cache: int | None = None,
        worker_cpus: str | None = None,
    ) -> None:
        """The gateway again, on a port of its own: another event loop (`listener.event_loop`), another device-side
        server (`listener.http_server`), another number of workers, another TLS session cache
        (`listener.tls_session_cache`, the default when None), its workers pinned (`listener.worker_cpus`, its TOML
        value: '"auto"', "[0, 1]"; not pinned when None), or traced (`name` "traced": bench.traced,
        tracemalloc and a snapshot on SIGUSR1), or probed (`name` "native": bench.native, glibc's allocator; `name`
        "objects": bench.objects, deep tracebacks and object counts)."""
        self.ports[name] = free_port()
        text = (self.root / "gateway.toml").read_text()
        bind = f'bind = "{self.layout.bind_host}:{self.ports["gateway"]}"\nworkers = {self.workers}\n'
        assert bind in text, "the gateway's [listener] bind line moved"
        ours = f'bind = "{self.layout.bind_host}:{self.ports[name]}"\nworkers = {workers}\n'
        ours += f'event_loop = "{event_loop}"\nhttp_server = "{http_server}"\n'
        if session_cache is not None:
            ours += f"tls_session_cache = {session_cache}\n"
        if worker_cpus is not None:
            ours += f"worker_cpus = {worker_cpus}\n"
        (self.root / f"{name}.toml").write_text(text.replace(bind, ours, 1))
        module = {"traced": "bench.traced", "native": "bench.native", "objects": "bench.objects"}.get(name, "proxy")
        argv = [*self.wrap, sys.executable, "-m", module, "run", "--config", str(self.root / f"{name}.toml")]
        env = {**self.layout.env(), "KCD_BENCH_SNAPSHOT": str(self.root / f"{name}-snapshot.json")}
        self.start(name, argv, self.ports[name], core=core, env=env, timeout=self.listen_timeout)

    def start_baseline(self, code: Path, *, bound: bool = False) -> None:
        """Another build of the gateway (a copy of an older tree, e.g. `git archive main`), same configuration
        on a port of its own, for before/after ratios in one run. Its configuration has no connection-bound
        route (an older build may not know the key) unless `bound` (bench.paired: a build that knows it)."""
        self.ports["baseline"] = free_port()
        text = (self.root / "gateway.toml").read_text()
        text = text.replace(f':{self.ports["gateway"]}"', f':{self.ports["baseline"]}"', 1)
        if not bound:
            text = text.replace('backend_binding = "connection"\n', "")
        (self.root / "baseline.toml").write_text(text)
        argv = [*self.wrap, sys.executable, "-m", "proxy", "run", "--config", str(self.root / "baseline.toml")]
        env = {**self.layout.env(), "PYTHONPATH": str(code), "PYTHONDONTWRITEBYTECODE": "1"}
        self.start(
            "baseline", argv, self.ports["baseline"], core=self.cores[0], env=env, cwd=code, timeout=self.listen_timeout
        )

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def teardown(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        runner.down(self.layout)
