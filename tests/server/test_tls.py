"""blt-serve over HTTPS (--ssl-keyfile, --ssl-certfile) with a self-signed certificate made by openssl, and
the flags' checks; --root-path reaches uvicorn."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import httpx
import pytest
from serverkit import Process

from server.settings import load_settings


@pytest.fixture
def certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate to serve HTTPS with")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return key, cert


def test_blt_serve_speaks_https(tiny, certificate):
    key, cert = certificate
    proc = Process(tiny, "--ssl-keyfile", str(key), "--ssl-certfile", str(cert), scheme="https")
    try:
        trusted = ssl.create_default_context(cafile=str(cert))  # the certificate checks out against itself
        with httpx.Client(verify=trusted, timeout=60) as c:
            r = c.post(f"{proc.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 4
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{proc.port}/health", timeout=5)  # no plain HTTP on that port
    finally:
        proc.stop()


def test_tls_and_root_path_flags(tmp_path, capsys):
    from server.__main__ import uvicorn_config

    key = tmp_path / "key.pem"
    key.write_text("not checked here")
    with pytest.raises(SystemExit):
        load_settings(["--ssl-keyfile", str(key)], environ={})
    assert "go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_settings(["--ssl-keyfile", str(key), "--ssl-certfile", str(tmp_path / "missing.pem")], environ={})
    assert "missing.pem: no such file" in capsys.readouterr().err
    config = uvicorn_config(object(), load_settings(["--root-path", "/blt"], environ={}))
    assert config.root_path == "/blt" and config.ssl_keyfile is None
