"""A PyPI-compatible package index on loopback for download tests.

Serves the wheels in a folder as a "simple" index (PEP 503), sending files
no faster than a given rate so that a test can watch a download's progress.
A project with no wheels in the folder gets an empty page, as PyPI answers
for a version it does not have.

    python3 package_index.py WHEEL_DIR BYTES_PER_SECOND

Prints `listening on PORT` once it accepts connections.
"""

import hashlib
import html
import http.server
import os
import re
import sys
import time

CHUNK = 64 * 1024


def normalized(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def main():
    wheel_dir, rate = sys.argv[1], float(sys.argv[2])
    wheels = {}
    for name in sorted(os.listdir(wheel_dir)):
        if name.endswith(".whl"):
            path = os.path.join(wheel_dir, name)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            wheels[name] = (path, digest.hexdigest())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            parts = [p for p in self.path.split("?")[0].split("/") if p]
            if len(parts) == 2 and parts[0] == "simple":
                self.project_page(normalized(parts[1]))
            elif len(parts) == 2 and parts[0] == "files" and parts[1] in wheels:
                self.send_wheel(*wheels[parts[1]])
            else:
                self.send_error(404)

        def project_page(self, project):
            links = "".join(
                f'<a href="/files/{html.escape(name)}#sha256={digest}">{html.escape(name)}</a><br/>'
                for name, (_, digest) in wheels.items()
                if normalized(name.split("-")[0]) == project
            )
            body = f"<!DOCTYPE html><html><body>{links}</body></html>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def send_wheel(self, path, _digest):
            size = os.path.getsize(path)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            started = time.monotonic()
            sent = 0
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)

        def log_message(self, format, *args):
            sys.stderr.write("package index: " + (format % args) + "\n")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
