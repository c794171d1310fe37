"""A Hugging Face Hub-compatible file server on loopback, for the Hub tests.

Serves the repositories under a folder, laid out as ORG/REPO/FILE, the way
the Hub's API and its `resolve` URLs do, with what hf-hub, huggingface_hub
and llama.cpp rely on:

- `GET /api/models/ORG/REPO[/revision/REV]`: `id`, `sha` (the commit) and
  `siblings` with each file's size and, for every file, the SHA-256 the Hub
  gives LFS files (`lfs.sha256`).
- `HEAD` and `GET /ORG/REPO/resolve/REV/FILE`: `ETag` (the SHA-256, quoted),
  `X-Repo-Commit`, `Content-Length`, `Accept-Ranges: bytes`; a `Range:
  bytes=A-B` request gets 206 with `Content-Range`, one it cannot satisfy 416.
- A repository with a file `.token` is gated: without `Authorization: Bearer
  <that token>` it answers 401, with another token 403 (`X-Error-Code:
  GatedRepo`, as the Hub does).
- The token `hf_revoked` is one the Hub no longer knows: every repository
  answers it 401 with no `X-Error-Code`, as the Hub answers bad credentials.
- A repository with a file `.no-ranges` ignores `Range` and sends whole
  files, as some servers do.
- A missing repository or file answers 404 with `X-Error-Code`
  `RepoNotFound`, `RevisionNotFound` or `EntryNotFound`.

Every body byte sent is counted per client, named by the `User-Agent`
header; `GET /_stats` returns the counts as JSON and `POST /_stats/reset`
clears them. Bodies go out no faster than BYTES_PER_SECOND in all, shared by
every connection as one link would be (0: no limit).

    python3 hub_server.py ROOT BYTES_PER_SECOND

Prints `listening on PORT` once it accepts connections. The commit of every
repository is a fixed function of its name, so tests can predict it.
"""

import hashlib
import http.server
import json
import os
import re
import sys
import threading
import time
import urllib.parse

CHUNK = 64 * 1024


def commit_of(repo):
    return hashlib.sha1(repo.encode()).hexdigest()


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main():
    root, rate = sys.argv[1], float(sys.argv[2])
    hashes = {}
    stats = {}
    lock = threading.Lock()
    # When the shared link is next free to send, for the rate limit.
    link_free_at = [time.monotonic()]

    def repo_dir(org, name):
        path = os.path.join(root, org, name)
        return path if os.path.isdir(path) else None

    def files_of(path):
        return sorted(
            f for f in os.listdir(path) if not f.startswith(".") and os.path.isfile(os.path.join(path, f))
        )

    def file_hash(path):
        # Keyed by what the file is now, so that a file replaced while the
        # server runs gets its new hash (and ETag).
        st = os.stat(path)
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        with lock:
            if key not in hashes:
                hashes[key] = sha256_of(path)
            return hashes[key]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def client(self):
            return self.headers.get("User-Agent", "unknown")

        def fail(self, status, code, message):
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def refused(self, path):
            """The gate of a gated repository: None when the request may pass."""
            token_file = os.path.join(path, ".token")
            if not os.path.isfile(token_file):
                return None
            with open(token_file) as f:
                token = f.read().strip()
            given = self.headers.get("Authorization", "")
            if not given.startswith("Bearer "):
                return (401, "this repository is gated: log in with a token that accepted its terms")
            if given[len("Bearer "):] != token:
                return (403, "this token has not accepted the repository's terms")
            return None

        def repo(self, org, name, rev):
            if self.headers.get("Authorization", "") == "Bearer hf_revoked":
                self.fail(401, None, "Invalid credentials in Authorization header")
                return None
            path = repo_dir(org, name)
            if path is None:
                self.fail(404, "RepoNotFound", f"repository {org}/{name} not found")
                return None
            gate = self.refused(path)
            if gate is not None:
                self.fail(gate[0], "GatedRepo", gate[1])
                return None
            if rev not in (None, "main", commit_of(f"{org}/{name}")):
                self.fail(404, "RevisionNotFound", f"revision {rev} not found")
                return None
            return path

        def do_GET(self):
            self.route()

        def do_HEAD(self):
            self.route()

        def do_POST(self):
            if self.path == "/_stats/reset":
                with lock:
                    stats.clear()
                self.send_json({})
            else:
                self.fail(404, "EntryNotFound", "not found")

        def route(self):
            url = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
            if parts == ["_stats"]:
                with lock:
                    self.send_json(dict(stats))
            elif len(parts) in (4, 6) and parts[:2] == ["api", "models"]:
                rev = parts[5] if len(parts) == 6 and parts[4] == "revision" else None
                self.info(parts[2], parts[3], rev)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self.resolve(parts[0], parts[1], parts[3], "/".join(parts[4:]))
            else:
                self.fail(404, "EntryNotFound", f"{url.path} not found")

        def send_json(self, value):
            body = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def info(self, org, name, rev):
            path = self.repo(org, name, rev)
            if path is None:
                return
            siblings = []
            for f in files_of(path):
                full = os.path.join(path, f)
                size = os.path.getsize(full)
                siblings.append(
                    {
                        "rfilename": f,
                        "size": size,
                        "lfs": {"sha256": file_hash(full), "size": size, "pointerSize": 134},
                    }
                )
            self.send_json({"id": f"{org}/{name}", "sha": commit_of(f"{org}/{name}"), "siblings": siblings})

        def resolve(self, org, name, rev, filename):
            path = self.repo(org, name, rev)
            if path is None:
                return
            full = os.path.join(path, filename)
            if filename.startswith(".") or not os.path.isfile(full):
                self.fail(404, "EntryNotFound", f"{filename} not found in {org}/{name}")
                return
            size = os.path.getsize(full)
            start, end = 0, size - 1
            ranged = self.headers.get("Range")
            if os.path.isfile(os.path.join(path, ".no-ranges")):
                ranged = None
            if ranged:
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", ranged.strip())
                if not match or int(match.group(1)) >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            self.send_response(206 if ranged else 200)
            self.send_header("ETag", f'"{file_hash(full)}"')
            self.send_header("X-Repo-Commit", commit_of(f"{org}/{name}"))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if self.command == "HEAD":
                return
            self.send_body(full, start, end - start + 1)

        def send_body(self, full, start, length):
            sent = 0
            with open(full, "rb") as f:
                f.seek(start)
                while sent < length:
                    chunk = f.read(min(CHUNK, length - sent))
                    if not chunk:
                        break
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    sent += len(chunk)
                    with lock:
                        stats[self.client()] = stats.get(self.client(), 0) + len(chunk)
                        if rate > 0:
                            # This chunk occupies the link after those before it.
                            now = time.monotonic()
                            link_free_at[0] = max(link_free_at[0], now) + len(chunk) / rate
                            wait = link_free_at[0] - now
                        else:
                            wait = 0
                    if wait > 0:
                        time.sleep(wait)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
