"""Dataset sources are fenced in at fetch time: files under the data root only, https to public addresses only."""

import hashlib
import io
import os
import socket

import pytest

from diloco.data import DatasetError, SourcePolicy, address_is_public, load_documents

BODY = b"alpha doc\n\nbeta doc\n\ngamma doc"
SHA = hashlib.sha256(BODY).hexdigest()
PUBLIC = "93.184.215.14"


class FakeResponse:
    def __init__(self, status, headers, body):
        self.status = status
        self._headers = {k.lower(): v for k, v in headers.items()}
        self._body = io.BytesIO(body)
        self.closed = False

    def getheader(self, name, default=None):
        return self._headers.get(name.lower(), default)

    def read(self, n=-1):
        return self._body.read(n)

    def close(self):
        self.closed = True


class FakeWeb:
    """A transport and a resolver: ``routes[(host, target)] = (status, headers, body)``; records each connection."""

    def __init__(self, dns=None, routes=None):
        self.dns = dns or {}
        self.routes = routes or {}
        self.connections: list[tuple[str, str, int, str]] = []
        self.lookups: list[str] = []

    def resolve(self, host, port):
        self.lookups.append(host)
        if host not in self.dns:
            raise OSError(f"cannot resolve {host}: unknown name")
        return list(self.dns[host])

    def open(self, *, address, host, port, target, timeout):
        self.connections.append((address, host, port, target))
        if (host, target) not in self.routes:
            raise ConnectionRefusedError(f"connection to {address}:{port} refused")
        status, headers, body = self.routes[(host, target)]
        return FakeResponse(status, headers, body)

    def policy(self, **kwargs):
        return SourcePolicy(resolve=self.resolve, open=self.open, **kwargs)


@pytest.fixture
def web():
    return FakeWeb(dns={"data.example": [PUBLIC]}, routes={("data.example", "/corpus.txt"): (200, {}, BODY)})


# --- https -------------------------------------------------------------------------------------------


def test_https_download_is_verified_cached_and_connects_to_the_checked_address(web, tmp_path):
    cache = tmp_path / "cache"
    docs = load_documents("https://data.example/corpus.txt", SHA, str(cache), policy=web.policy())
    assert docs == ["alpha doc", "beta doc", "gamma doc"]
    assert web.connections == [(PUBLIC, "data.example", 443, "/corpus.txt")]
    assert (cache / f"{SHA}.txt").read_bytes() == BODY
    assert load_documents("https://data.example/corpus.txt", SHA, str(cache), policy=web.policy()) == docs
    assert len(web.connections) == 1  # the second load came from the cache


def test_https_sha_mismatch_leaves_nothing_cached(web, tmp_path):
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        load_documents("https://data.example/corpus.txt", "b" * 64, str(tmp_path), policy=web.policy())
    assert list(tmp_path.iterdir()) == []


def test_https_unreachable(web, tmp_path):
    with pytest.raises(DatasetError, match="could not download dataset source 'https://data.example/missing'"):
        load_documents("https://data.example/missing", SHA, str(tmp_path), policy=web.policy())


def test_https_error_status_is_reported(web, tmp_path):
    web.routes[("data.example", "/gone")] = (404, {}, b"not here")
    with pytest.raises(DatasetError, match="answered 404"):
        load_documents("https://data.example/gone", SHA, str(tmp_path), policy=web.policy())


@pytest.mark.parametrize(
    "source",
    [
        "https://127.0.0.1:6379/x",
        "https://[::1]/x",
        "https://10.0.0.1/",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::ffff:127.0.0.1]/x",
        "https://0.0.0.0/x",
        "https://224.0.0.1/x",
        "https://[fe80::1]/x",
        "https://[2002:7f00:1::]/x",  # 6to4 wrapping 127.0.0.1
        "https://100.64.0.1/x",  # carrier-grade NAT
    ],
)
def test_https_to_a_non_public_address_is_refused_without_connecting(source, web, tmp_path):
    with pytest.raises(DatasetError, match="non-public address") as info:
        load_documents(source, SHA, str(tmp_path), policy=web.policy())
    assert repr(source) in str(info.value)
    assert web.connections == []


def test_a_literal_private_address_is_refused_even_when_its_bytes_are_cached(web, tmp_path):
    load_documents("https://data.example/corpus.txt", SHA, str(tmp_path), policy=web.policy())
    with pytest.raises(DatasetError, match="non-public address 127.0.0.1"):
        load_documents("https://127.0.0.1/corpus.txt", SHA, str(tmp_path), policy=web.policy())


@pytest.mark.parametrize("answers", [["10.1.2.3"], [PUBLIC, "127.0.0.1"], ["fd00::5"], ["::ffff:10.0.0.1"]])
def test_a_name_resolving_to_a_private_address_is_refused(answers, web, tmp_path):
    web.dns["intranet.example"] = answers
    web.routes[("intranet.example", "/x")] = (200, {}, BODY)
    with pytest.raises(DatasetError, match=r"'https://intranet.example/x' refused: intranet.example resolves to "
                                           r"non-public address"):
        load_documents("https://intranet.example/x", SHA, str(tmp_path), policy=web.policy())
    assert web.connections == []


def test_a_name_that_does_not_resolve(web, tmp_path):
    with pytest.raises(DatasetError, match="'https://nowhere.example/x'.*cannot resolve"):
        load_documents("https://nowhere.example/x", SHA, str(tmp_path), policy=web.policy())


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("https://10.0.0.1/corpus.txt", "redirected to https://10.0.0.1/corpus.txt.*non-public address 10.0.0.1"),
        ("https://internal.example/corpus.txt", "internal.example resolves to non-public address 192.168.1.9"),
        ("http://data.example/corpus.txt", "only https URLs"),
        ("file:/etc/shadow", "only https URLs"),
    ],
)
def test_a_redirect_to_a_private_address_is_refused(location, message, web, tmp_path):
    web.dns["internal.example"] = ["192.168.1.9"]
    web.routes[("internal.example", "/corpus.txt")] = (200, {}, BODY)
    web.routes[("data.example", "/moved")] = (302, {"Location": location}, b"")
    with pytest.raises(DatasetError, match=message) as info:
        load_documents("https://data.example/moved", SHA, str(tmp_path), policy=web.policy())
    assert "'https://data.example/moved'" in str(info.value)
    assert [c[1] for c in web.connections] == ["data.example"]


def test_redirects_to_public_hosts_are_followed_and_counted(web, tmp_path):
    web.dns["mirror.example"] = ["2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    web.routes[("data.example", "/moved")] = (301, {"Location": "https://mirror.example/corpus.txt"}, b"")
    web.routes[("mirror.example", "/corpus.txt")] = (200, {}, BODY)
    docs = load_documents("https://data.example/moved", SHA, str(tmp_path), policy=web.policy())
    assert docs == ["alpha doc", "beta doc", "gamma doc"]
    assert [(c[0], c[1]) for c in web.connections] == [
        (PUBLIC, "data.example"), ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", "mirror.example")]

    web.routes[("data.example", "/loop")] = (307, {"Location": "/loop"}, b"")
    with pytest.raises(DatasetError, match="more than 2 redirects"):
        load_documents("https://data.example/loop", "c" * 64, str(tmp_path), policy=web.policy(max_redirects=2))


def test_https_oversize_is_refused_by_length_and_while_streaming(web, tmp_path):
    web.routes[("data.example", "/big")] = (200, {"Content-Length": "1000"}, b"x" * 1000)
    with pytest.raises(DatasetError, match="'https://data.example/big' refused: 1000 bytes, over the limit of 100"):
        load_documents("https://data.example/big", SHA, str(tmp_path), policy=web.policy(max_bytes=100))
    web.routes[("data.example", "/liar")] = (200, {"Content-Length": "10"}, b"x" * (3 << 20))
    with pytest.raises(DatasetError, match="'https://data.example/liar' refused: more than 100 bytes"):
        load_documents("https://data.example/liar", SHA, str(tmp_path), policy=web.policy(max_bytes=100))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source", ["http://data.example/corpus.txt", "ftp://data.example/x", "gopher://x/",
                                    "https://user:pw@data.example/corpus.txt"])
def test_other_schemes_and_credentials_are_refused(source, web, tmp_path):
    with pytest.raises(DatasetError, match=r"unsupported dataset source|credentials"):
        load_documents(source, SHA, str(tmp_path), policy=web.policy())
    assert web.connections == []


def test_address_is_public():
    for address in ["8.8.8.8", "2001:4860:4860::8888", PUBLIC]:
        assert address_is_public(address), address
    for address in ["127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.0.1", "169.254.169.254", "0.0.0.0", "::",
                    "::1", "fe80::1", "fc00::1", "224.0.0.1", "ff0e::1", "240.0.0.1", "255.255.255.255",
                    "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:0808:0808::", "2001:0:4136:e378::1",
                    "100.64.0.1", "198.18.0.1", "192.0.2.1", "not an address"]:
        assert not address_is_public(address), address


# --- file: -------------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "corpus.txt").write_bytes(BODY)
    return root


def test_a_file_under_the_root_is_read(root):
    docs = load_documents(f"file:{root}/corpus.txt", SHA, policy=SourcePolicy(data_root=str(root)))
    assert docs == ["alpha doc", "beta doc", "gamma doc"]
    inner = root / "sub"
    inner.mkdir()
    (inner / "link.txt").symlink_to(root / "corpus.txt")  # a symlink that stays inside the root is fine
    assert load_documents(f"file:{inner}/link.txt", policy=SourcePolicy(data_root=str(root))) == docs


def test_file_sources_are_refused_without_a_data_root(root):
    with pytest.raises(DatasetError, match="no data root is configured"):
        load_documents(f"file:{root}/corpus.txt")


@pytest.mark.parametrize("path", ["/etc/shadow", "/etc/passwd", "/proc/self/environ", "/dev/zero",
                                  "{root}/../secret.txt", "{root}/../data-other/x.txt", "{root}/link-out"])
def test_a_file_outside_the_root_is_refused(path, root):
    (root.parent / "secret.txt").write_text("hunter2")
    (root.parent / "data-other").mkdir()
    (root.parent / "data-other" / "x.txt").write_text("not yours")
    (root / "link-out").symlink_to(root.parent / "secret.txt")
    source = "file:" + path.format(root=root)
    with pytest.raises(DatasetError, match="resolves outside the data root") as info:
        load_documents(source, policy=SourcePolicy(data_root=str(root)))
    assert repr(source) in str(info.value)


def test_a_root_of_symlinks_to_system_files_is_refused(root):
    (root / "zero").symlink_to("/dev/zero")
    (root / "env").symlink_to("/proc/self/environ")
    (root / "dir").symlink_to("/etc")
    policy = SourcePolicy(data_root=str(root))
    for name in ["zero", "env", "dir/shadow"]:
        with pytest.raises(DatasetError, match="resolves outside the data root"):
            load_documents(f"file:{root}/{name}", policy=policy)


def test_only_regular_files_are_read(root):
    os.mkfifo(root / "fifo")
    (root / "folder").mkdir()
    server = socket.socket(socket.AF_UNIX)
    sock_path = root / "sock"
    try:
        server.bind(str(sock_path))
    except OSError:  # path too long for a unix socket on this machine
        sock_path = None
    policy = SourcePolicy(data_root=str(root))
    try:
        with pytest.raises(DatasetError, match="'file:.*/fifo' refused: not a regular file"):
            load_documents(f"file:{root}/fifo", policy=policy)  # and does not hang waiting for a writer
        with pytest.raises(DatasetError, match="not a regular file"):
            load_documents(f"file:{root}/folder", policy=policy)
        if sock_path is not None:
            with pytest.raises(DatasetError, match="cannot read it|not a regular file"):
                load_documents(f"file:{sock_path}", policy=policy)
        with pytest.raises(DatasetError, match="resolves outside the data root"):
            load_documents(f"file:{root}", policy=policy)  # the root itself
    finally:
        server.close()


def test_an_oversize_file_is_refused(root):
    with pytest.raises(DatasetError, match=r"refused: 30 bytes, over the limit of 10"):
        load_documents(f"file:{root}/corpus.txt", policy=SourcePolicy(data_root=str(root), max_bytes=10))


def test_a_missing_file_is_named(root):
    with pytest.raises(DatasetError, match="'file:.*/absent.txt': cannot read it"):
        load_documents(f"file:{root}/absent.txt", policy=SourcePolicy(data_root=str(root)))


# --- the real transport ------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path):
    """A one-file HTTPS server on 127.0.0.1 with a self-signed certificate for data.example."""
    import http.server
    import shutil
    import ssl
    import subprocess
    import threading

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=data.example", "-addext", "subjectAltName=DNS:data.example", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Host")))
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client_context = ssl.create_default_context(cafile=str(cert))
    yield server.server_port, client_context, seen
    server.shutdown()
    server.server_close()


def test_the_pinned_connection_goes_to_the_checked_address_and_verifies_the_host_name(tls_server):
    import ssl

    from diloco.data import open_https

    port, context, seen = tls_server
    response = open_https(address="127.0.0.1", host="data.example", port=port, target="/corpus.txt", timeout=10,
                          context=context)
    try:
        assert response.status == 200 and response.read() == BODY
    finally:
        response.close()
    assert seen == [("/corpus.txt", f"data.example:{port}")]
    with pytest.raises(ssl.SSLCertVerificationError):  # a certificate for another name is refused
        open_https(address="127.0.0.1", host="other.example", port=port, target="/corpus.txt", timeout=10,
                   context=context)


def test_international_host_names_are_resolved_in_their_ascii_form(web, tmp_path):
    web.dns["xn--bcher-kva.example"] = [PUBLIC]
    web.routes[("xn--bcher-kva.example", "/c.txt")] = (200, {}, BODY)
    docs = load_documents("https://bücher.example/c.txt", SHA, str(tmp_path), policy=web.policy())
    assert docs == ["alpha doc", "beta doc", "gamma doc"]
    assert web.lookups == ["xn--bcher-kva.example"]
