"""ZeroMQ CURVE for the engine's sockets: key files, the server's ZAP allow-list, the clients' keys.

Key pairs are zmq's certificate files (``zmq.auth.load_certificate`` reads them): ``NAME.key``
holds the public key and may be copied anywhere; ``NAME.key_secret`` holds both and is mode 0600.
The engine encrypts both of its sockets with its own pair and lets in only clients whose public
key files lie in its allowed-clients directory (a ZAP handler, ``zmq.auth.thread.ThreadAuthenticator``);
a refused client gets no reply at all, and the engine logs its key.
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from cdae.engine.config import CurveClientKeys, CurveServerKeys
from cdae.engine.errors import EngineError

Log = Callable[[str], None]
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_REFUSAL_LOG_INTERVAL_S = 60.0  # a refused client reconnects every 0.1 s: one line per key per minute


def _certificate(public: bytes, secret: bytes | None, name: str) -> str:
    kind = "secret" if secret else "public"
    lines = [f"#   ****  cdae CURVE {kind} key of {name!r}: made by `cdae keys` {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}  ****",
             "#   ZeroMQ CURVE certificate (zmq.auth.load_certificate reads it)" +
             (": keep it secret, mode 0600" if secret else ""),
             "metadata", f'    name = "{name}"', "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str, mode: int, overwrite: bool) -> None:
    # created with its final mode: a secret key is never readable by others, not even for a moment
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)  # whatever the umask
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if it exists: never silently replace a deployed key
    finally:
        if tmp.exists():
            tmp.unlink()


def make_key_pair(directory: Path | str, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (0600) in ``directory``; returns both paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    pub_path, sec_path = d / f"{name}{PUBLIC_SUFFIX}", d / f"{name}{SECRET_SUFFIX}"
    if not overwrite:
        for p in (pub_path, sec_path):
            if p.exists():
                raise EngineError(f"{p} exists; refusing to replace a key (give --force to make a new pair)")
    _write_new(sec_path, _certificate(public, secret, name), 0o600, overwrite)
    _write_new(pub_path, _certificate(public, None, name), 0o644, overwrite)
    return pub_path, sec_path


def load_public(path: Path | str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read the CURVE public key file {path}: {e}") from e
    if not public:
        raise EngineError(f"{path}: no public-key in this certificate file")
    return public


def load_secret(path: Path | str) -> tuple[bytes, bytes]:
    """(public, secret) from a secret key file; refuses one that others can read."""
    p = Path(path)
    try:
        mode = p.stat().st_mode & 0o777
        public, secret = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read the CURVE secret key file {p}: {e}") from e
    if not secret or not public:
        raise EngineError(f"{p}: no secret-key in this certificate file (is it the public .key file?)")
    if mode & 0o077:
        raise EngineError(f"{p}: mode {mode:04o} lets others read the secret key; chmod 600 {p}")
    return public, secret


def apply_client(sock: zmq.Socket, keys: CurveClientKeys) -> None:
    """Make ``sock`` a CURVE client of the engine whose public key ``keys`` names (before connect)."""
    public, secret = load_secret(keys.secret_key_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = load_public(keys.server_public_key_file)


class _AllowList:
    """The ZAP callback: a client key is let in if its certificate is in the directory (re-read on change)."""

    def __init__(self, directory: Path, log: Log) -> None:
        self.directory = directory
        self.log = log
        self._stamp: float | None = None
        self._keys: set[bytes] = set()
        self._lock = threading.Lock()
        self._logged: dict[bytes, float] = {}
        self.refused = 0
        self.reload()

    def reload(self) -> None:
        stamp = self.directory.stat().st_mtime
        if stamp != self._stamp:  # a client added or removed: no restart needed
            keys = set(zmq.auth.load_certificates(str(self.directory)))
            self._keys, self._stamp = keys, stamp

    def callback(self, domain: str, key: bytes) -> bool:
        with self._lock:
            try:
                self.reload()
            except OSError as e:
                self.log(f"CURVE: cannot read the allowed clients in {self.directory}: {e}; refusing everyone")
                return False
            if key in self._keys:
                return True
            self.refused += 1
            now = time.monotonic()
            if now - self._logged.get(key, -1e9) >= _REFUSAL_LOG_INTERVAL_S:
                self._logged[key] = now
                self.log(f"CURVE: refused a client with public key {key.decode(errors='replace')}: not among the "
                         f"allowed clients in {self.directory} ({self.refused} refusals so far)")
            return False


class CurveServer:
    """The engine's CURVE side: its key pair, and the ZAP thread that checks every client's key."""

    def __init__(self, ctx: zmq.Context, keys: CurveServerKeys, log: Log) -> None:
        self.public, self.secret = load_secret(keys.secret_key_file)
        d = Path(keys.allowed_clients_dir)
        if not d.is_dir():
            raise EngineError(f"CURVE allowed_clients_dir {d} is not a folder (put the clients' .key files there)")
        self.allow = _AllowList(d, log)
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=self.allow)

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server (before bind)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        self.auth.stop()
