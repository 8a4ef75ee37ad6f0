"""A local imitation of the ISIC Archive API v2 and the Harvard Dataverse API, served on
127.0.0.1, with faults that can be queued per path: HTTP errors, Retry-After, bodies cut short,
dropped connections, garbled bytes. It records every request so tests can see what was fetched."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class FakeRemote:
    def __init__(self, isic_images=(), dataverse_files=(), page_size=4, challenge_images=None):
        """isic_images: dicts with isic_id, clinical (dict) and body (bytes), the HAM10000 collection.
        challenge_images: {collection name: such dicts}, more collections.
        dataverse_files: dicts with id, name, body, md5, and tabular (bool)."""
        self.isic_images = list(isic_images)
        self.collection_images = {"212": self.isic_images}
        self.dataverse_files = list(dataverse_files)
        self.page_size = page_size
        self.faults = {}  # path -> list of faults, consumed one per request
        self.requests = []  # (path, headers) of every request
        self.collections = [{"id": 5, "name": "ISIC 2019: Training"},
                            {"id": 99, "name": "HAM10000 lesion segmentations"},
                            {"id": 212, "name": "HAM10000"}]
        for k, (name, images) in enumerate((challenge_images or {}).items()):
            self.collections.append({"id": 300 + k, "name": name})
            self.collection_images[str(300 + k)] = list(images)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def fault(self, path, *faults):
        self.faults.setdefault(path, []).extend(faults)

    def fetched(self, prefix):
        return [path for path, _ in self.requests if path.startswith(prefix)]

    # -- the routes --------------------------------------------------------------------------

    def _page(self, items, query, base):
        offset = int(query.get("offset", ["0"])[0])
        nxt = offset + self.page_size
        rest = {k: v[0] for k, v in query.items() if k != "offset"}
        next_url = (f"{self.url}{base}?" + "&".join(f"{k}={v}" for k, v in {**rest, "offset": nxt}.items())
                    if nxt < len(items) else None)
        return {"count": len(items), "next": next_url, "previous": None,
                "results": items[offset:nxt]}

    def _route(self, path, query):
        """(status, content type, body) for a GET, or None for 404."""
        if path == "/api/v2/collections/":
            return 200, "application/json", json.dumps(self._page(self.collections, query, path)).encode()
        if path == "/api/v2/images/search/":
            chosen = query.get("collections", [""])[0]
            results = [{"isic_id": im["isic_id"], "public": True, "copyright_license": "CC-BY-NC",
                        "attribution": "ViDIR Group, Medical University of Vienna",
                        "files": {"full": {"url": f"{self.url}/files/{im['isic_id']}.jpg", "size": len(im["body"])}},
                        "metadata": {"acquisition": {}, "clinical": im["clinical"]}}
                       for im in self.collection_images.get(chosen, [])]
            return 200, "application/json", json.dumps(self._page(results, query, path)).encode()
        if path.startswith("/files/"):
            for im in (im for images in self.collection_images.values() for im in images):
                if path == f"/files/{im['isic_id']}.jpg":
                    return 200, "image/jpeg", im["body"]
        if path == "/api/datasets/:persistentId/":
            files = [{"label": f["name"], "dataFile": {
                "id": f["id"], "md5": f["md5"], "filesize": len(f["body"]),
                **({"filename": f["name"].rsplit(".", 1)[0] + ".tab", "originalFileName": f["name"]}
                   if f["tabular"] else {"filename": f["name"]})}} for f in self.dataverse_files]
            return 200, "application/json", json.dumps({"status": "OK", "data": {"latestVersion": {"files": files}}}).encode()
        if path.startswith("/api/access/datafile/"):
            for f in self.dataverse_files:
                if path == f"/api/access/datafile/{f['id']}":
                    if f["tabular"] and query.get("format") != ["original"]:
                        return 200, "text/tab-separated-values", f["body"].replace(b",", b"\t")
                    return 200, "application/octet-stream", f["body"]
        return None

    def _handler(self):
        remote = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                parsed = urlparse(self.path)
                remote.requests.append((parsed.path, dict(self.headers)))
                queued = remote.faults.get(parsed.path)
                fault = queued.pop(0) if queued else None
                if fault == "reset":
                    self.close_connection = True
                    return  # no answer at all
                if fault in ("401", "403", "404", "500", "502", "503"):
                    return self._send(int(fault), "text/plain", b"fault")
                if fault == "429":
                    return self._send(429, "text/plain", b"slow down", {"Retry-After": "2"})
                routed = remote._route(parsed.path, parse_qs(parsed.query))
                if routed is None:
                    return self._send(404, "text/plain", b"not found")
                status, content_type, body = routed
                if fault == "garble":
                    body = bytes(b ^ 0x55 for b in body)
                start = 0
                byte_range = self.headers.get("Range")
                if byte_range and byte_range.startswith("bytes="):
                    start = int(byte_range[6:].split("-")[0])
                    if start >= len(body):
                        return self._send(416, "text/plain", b"")
                    status = 206
                headers = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"} if status == 206 else {}
                if fault == "truncate":  # announce the whole body, send half, hang up
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body) - start))
                    self.end_headers()
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.close_connection = True
                    return
                self._send(status, content_type, body[start:], headers)

            def _send(self, status, content_type, body, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        return Handler
