"""An in-memory Google Cloud Storage for tests: `gs://` paths without a network.

Two doors onto one store (a dict of object name -> bytes, fsspec's MemoryFileSystem layout `/bucket/object`):

  - `GcsMemoryFileSystem`: the fsspec filesystem etils.epath uses for `gs://` paths (epath's `gpath` sends gs://,
    s3://, az:// to its fsspec backend when TensorFlow is not installed, and that backend asks fsspec for the
    implementation registered as "gcs"). Object-store semantics where they matter: an object written appears only
    when its writer closes (whole), appending is refused, and every reader gets its own handle (a snapshot).
  - `FakeGcsServer`: the few calls of the GCS JSON API that TensorStore's `gcs` kvstore driver makes (object
    read with byte ranges and generation preconditions, media upload with `ifGenerationMatch`, delete, list).
    Orbax writes checkpoint arrays through TensorStore, which talks HTTP to GCS itself rather than through fsspec;
    TensorStore honours `TENSORSTORE_GCS_HTTP_URL` (the endpoint) and `GOOGLE_AUTH_TOKEN_FOR_TESTING` (a fixed
    bearer token), so pointing it here puts the arrays into the same store as everything else.

`fake_gcs(monkeypatch)` wires both up for one test and undoes it afterwards (see `test_cloud_paths.py`).
"""

from __future__ import annotations

import contextlib
import http.server
import importlib
import io
import itertools
import json
import threading
import types
import urllib.parse

import fsspec
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

SCHEMES = ("gs", "gcs")


class GcsMemoryFileSystem(MemoryFileSystem):
  """fsspec's in-memory filesystem under the gs:// scheme, with its own store (not `memory://`'s)."""

  protocol = SCHEMES
  store: dict = {}
  pseudo_dirs: list = [""]
  lock = threading.Lock()  # held by the HTTP server while it reads or changes the store

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for scheme in SCHEMES:
      path = path.removeprefix(f"{scheme}://")
    return MemoryFileSystem._strip_protocol(path)

  def _open(self, path, mode="rb", **kwargs):
    key = self._strip_protocol(path)
    if "a" in mode or "+" in mode:
      raise NotImplementedError(f"object stores cannot append or update in place (mode {mode!r}: {path})")
    if mode == "rb":
      with self.lock:
        if key in self.store:
          return io.BytesIO(self.store[key].getvalue())
      raise FileNotFoundError(path)
    if key in self.pseudo_dirs:
      raise IsADirectoryError(path)
    return _Upload(self, key)

  @classmethod
  def reset(cls) -> None:
    cls.store.clear()
    cls.pseudo_dirs[:] = [""]

  @classmethod
  def files(cls) -> dict[str, bytes]:
    """Every object as gs://bucket/name -> bytes."""
    return {"gs:/" + key: f.getvalue() for key, f in cls.store.items()}


class _Upload(io.BytesIO):
  """A write: the object appears, whole, when the writer closes (as a GCS upload does when it is finalised)."""

  def __init__(self, fs: GcsMemoryFileSystem, key: str):
    super().__init__()
    self._fs, self._key = fs, key

  def close(self) -> None:
    if not self.closed:
      with self._fs.lock:
        MemoryFile(self._fs, self._key, self.getvalue()).commit()
    super().close()


class _Handler(http.server.BaseHTTPRequestHandler):
  """/storage/v1/b/<bucket>/o[/<object>] (GET: read, metadata, list; DELETE) and /upload/storage/v1/b/<bucket>/o
  (POST uploadType=media). Objects get a generation number, renewed whenever their bytes are replaced."""

  protocol_version = "HTTP/1.1"
  server: "FakeGcsServer"

  def log_message(self, *args) -> None:  # quiet
    pass

  def _reply(self, code: int, body: bytes = b"", headers=()) -> None:
    self.send_response(code)
    for key, value in headers:
      self.send_header(key, value)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _json(self, code: int, value) -> None:
    self._reply(code, json.dumps(value).encode(), [("Content-Type", "application/json")])

  def _request(self) -> tuple[list[str], dict[str, str]]:
    url = urllib.parse.urlsplit(self.path)
    self.server.calls.append((self.command, url.path))
    return url.path.split("/")[1:], dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))

  def _object(self, bucket: str, name: str) -> tuple[str, MemoryFile | None, int | None]:
    key = f"/{bucket}/{name}"
    f = GcsMemoryFileSystem.store.get(key)
    return key, f, (self.server.generation(key, f) if f is not None else None)

  @staticmethod
  def _precondition(query: dict[str, str], generation: int | None) -> int | None:
    """The HTTP status a failed `ifGeneration[Not]Match` gives, None when it holds (generation 0: no object)."""
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != (generation or 0):
      return 412
    if "ifGenerationNotMatch" in query and generation is not None and int(query["ifGenerationNotMatch"]) == generation:
      return 304
    return None

  @staticmethod
  def _metadata(bucket: str, name: str, f: MemoryFile, generation: int) -> dict:
    return {"kind": "storage#object", "bucket": bucket, "name": name, "generation": str(generation),
            "metageneration": "1", "size": str(f.size), "updated": "2024-01-01T00:00:00Z"}

  def do_GET(self) -> None:
    parts, query = self._request()
    if parts[:3] != ["storage", "v1", "b"] or len(parts) < 5 or parts[4] != "o":
      self.server.unhandled.append((self.command, self.path))
      return self._json(404, {"error": {"code": 404, "message": f"not implemented here: {self.path}"}})
    bucket = parts[3]
    if len(parts) == 5:
      return self._list(bucket, query)
    name = urllib.parse.unquote("/".join(parts[5:]))
    with GcsMemoryFileSystem.lock:
      _, f, generation = self._object(bucket, name)
      if f is None:
        return self._json(404, {"error": {"code": 404, "message": "no such object"}})
      failed = self._precondition(query, generation)
      if failed:
        return self._reply(failed)
      if query.get("alt") != "media":
        return self._json(200, self._metadata(bucket, name, f, generation))
      data = f.getvalue()
    headers = [("x-goog-generation", str(generation)), ("Content-Type", "application/octet-stream")]
    ranged = self.headers.get("Range")
    if not ranged:
      return self._reply(200, data, headers)
    first, last = ranged.split("=", 1)[1].split("-")
    start = int(first) if first else max(0, len(data) - int(last))
    stop = min(int(last) + 1, len(data)) if first and last else len(data)
    if start >= len(data) > 0:
      return self._reply(416, b"", [("Content-Range", f"bytes */{len(data)}")])
    headers.append(("Content-Range", f"bytes {start}-{max(start, stop - 1)}/{len(data)}"))
    return self._reply(206, data[start:stop], headers)

  def _list(self, bucket: str, query: dict[str, str]) -> None:
    prefix, start, end = query.get("prefix", ""), query.get("startOffset"), query.get("endOffset")
    items = []
    with GcsMemoryFileSystem.lock:
      for key in sorted(GcsMemoryFileSystem.store):
        if not key.startswith(f"/{bucket}/"):
          continue
        name = key[len(bucket) + 2:]
        if name.startswith(prefix) and (start is None or name >= start) and (end is None or name < end):
          items.append(self._metadata(bucket, name, *self._object(bucket, name)[1:]))
    self._json(200, {"kind": "storage#objects", "items": items})

  def do_POST(self) -> None:
    parts, query = self._request()
    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
    if parts[:4] != ["upload", "storage", "v1", "b"] or query.get("uploadType") != "media" or "name" not in query:
      self.server.unhandled.append((self.command, self.path))
      return self._json(400, {"error": {"code": 400, "message": f"not implemented here: {self.path}"}})
    bucket, name = parts[4], query["name"]
    with GcsMemoryFileSystem.lock:
      key, _, generation = self._object(bucket, name)
      if self._precondition(query, generation):
        return self._reply(412)
      GcsMemoryFileSystem.store[key] = MemoryFile(None, key, body)
      _, f, generation = self._object(bucket, name)
      return self._json(200, self._metadata(bucket, name, f, generation))

  def do_DELETE(self) -> None:
    parts, query = self._request()
    if parts[:3] != ["storage", "v1", "b"] or len(parts) < 6 or parts[4] != "o":
      self.server.unhandled.append((self.command, self.path))
      return self._json(400, {"error": {"code": 400, "message": f"not implemented here: {self.path}"}})
    bucket, name = parts[3], urllib.parse.unquote("/".join(parts[5:]))
    with GcsMemoryFileSystem.lock:
      key, f, generation = self._object(bucket, name)
      if f is None:
        return self._json(404, {"error": {"code": 404, "message": "no such object"}})
      if self._precondition(query, generation):
        return self._reply(412)
      del GcsMemoryFileSystem.store[key]
    return self._reply(204)


  def _unsupported(self) -> None:
    self._request()
    self.server.unhandled.append((self.command, self.path))
    self._reply(501)

  do_PUT = do_PATCH = do_HEAD = _unsupported


class FakeGcsServer(http.server.ThreadingHTTPServer):
  """The GCS JSON API subset of `_Handler` on 127.0.0.1 (a free port), serving `GcsMemoryFileSystem.store`."""

  daemon_threads = True

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.calls: list[tuple[str, str]] = []  # (method, path) of every request
    self.unhandled: list[tuple[str, str]] = []  # (method, full path) of requests this fake does not implement
    self._generations: dict[str, tuple[int, int]] = {}  # key -> (id of the stored MemoryFile, generation)
    self._counter = itertools.count(1)
    self._thread = threading.Thread(target=self.serve_forever, daemon=True)
    self._thread.start()

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.server_address[1]}"

  def generation(self, key: str, f: MemoryFile) -> int:
    """The object's generation: new whenever the stored file object is replaced (any write, by either door)."""
    known = self._generations.get(key)
    if known is None or known[0] != id(f):
      known = self._generations[key] = (id(f), next(self._counter))
    return known[1]

  def stop(self) -> None:
    self.shutdown()
    self.server_close()


@contextlib.contextmanager
def fake_gcs(monkeypatch, server: FakeGcsServer):
  """gs:// through `GcsMemoryFileSystem` (epath) and `server` (TensorStore) for the duration; the store starts
  empty and is cleared afterwards, and fsspec's and epath's registrations and caches are restored."""
  GcsMemoryFileSystem.reset()
  registry = importlib.import_module("fsspec.registry")._registry  # pylint: disable=protected-access
  for scheme in SCHEMES:  # what fsspec.register_implementation(scheme, ..., clobber=True) does, undone afterwards
    monkeypatch.setitem(registry, scheme, GcsMemoryFileSystem)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", server.url)
  monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake-token")
  # Orbax asks google-cloud-storage (not installed here; a gcsfs install brings it) whether the bucket has a
  # hierarchical namespace before listing checkpoint steps. This store has none.
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(gcs_utils, "get_bucket",
                      lambda name: types.SimpleNamespace(name=name, hierarchical_namespace_enabled=False))
  try:
    yield GcsMemoryFileSystem
  finally:
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    GcsMemoryFileSystem.clear_instance_cache()
    GcsMemoryFileSystem.reset()
