"""Workloads the VM tests checkpoint, and what CRIU needs in the guest."""

from __future__ import annotations

from seamless.criu.modules import CRIU_MODULES
from vmtest.qemu import Guest

#: Counts in memory; writes the count to FILE and says it on stdout (the journal).
COUNTER = (
    "import itertools, os, sys, time\n"
    "for i in itertools.count():\n"
    "    open(sys.argv[1] + '.new', 'w').write(str(i))\n"
    "    os.replace(sys.argv[1] + '.new', sys.argv[1])\n"
    "    print('count', i, flush=True); time.sleep(0.2)\n"
)


def prepare_for_criu(guest: Guest) -> None:
    guest.run("modprobe", "-a", *CRIU_MODULES)
    guest.run("ip", "link", "set", "lo", "up")


def start_counter(guest: Guest, unit: str, path: str) -> int:
    """Run a counter as the systemd service ``unit``; returns its PID once it counts."""
    guest.run("systemd-run", f"--unit={unit}", "python3", "-c", COUNTER, path)
    guest.sh(f"for i in $(seq 100); do test -s {path} && exit 0; sleep 0.1; done; exit 1")
    return int(guest.run("systemctl", "show", "-P", "MainPID", unit))


def read_counter(guest: Guest, path: str) -> int:
    """The number a workload keeps in ``path``. COUNTER and the pipe pair's reader
    truncate and rewrite their file: wait out the instant it is empty."""
    return int(guest.sh(f'for i in $(seq 50); do v=$(cat {path}); [ -n "$v" ] &&'
                        ' { echo "$v"; exit 0; }; sleep 0.1; done; exit 1'))

#: 256 MiB of known memory; on SIGUSR1 writes its PID and the memory's SHA-256 to FILE.
BIG_MEMORY = (
    "import hashlib, os, signal, sys\n"
    "memory = bytearray(b'seamless' * (32 << 20))\n"
    "def report(*_):\n"
    "    open(sys.argv[1] + '.tmp', 'w').write(f'{os.getpid()} '"
    " + hashlib.sha256(memory).hexdigest())\n"
    "    os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "signal.signal(signal.SIGUSR1, report)\n"
    "report()\n"
    "while True:\n"
    "    signal.pause()\n"
)

#: Two processes joined by a pipe: a writer numbering lines, a reader recording
#: the last number it got to FILE.
PIPE_PAIR = (
    "i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done | "
    "python3 -c 'import sys\nfor line in sys.stdin: open(sys.argv[1], \"w\").write(line)' \"$0\""
)

#: A shell that runs /bin/true without end: most of its time a child of its vfork.
VFORK_SPIN = "while :; do /bin/true; done"

#: posix_spawn (a vfork) of /bin/true whose child first opens the FIFO argv[1] for reading:
#: the child waits for a writer before its exec, its parent in the vfork. argv[2]: spawns.
SPAWN_THROUGH_FIFO = (
    "import os, sys, time\n"
    "n = 0\n"
    "while True:\n"
    "    pid = os.posix_spawn('/bin/true', ['true'], os.environ, file_actions=[\n"
    "        (os.POSIX_SPAWN_OPEN, 0, sys.argv[1], os.O_RDONLY, 0)])\n"
    "    os.waitpid(pid, 0)\n"
    "    n += 1\n"
    "    open(sys.argv[2], 'w').write(f'{n}\\n')\n"
    "    time.sleep(0.05)\n"
)

#: An HTTP server on PORT (every address) holding a counter in memory: POST adds one,
#: GET returns it.
HTTP_STATE = (
    "import http.server, sys\n"
    "state = {'n': 0}\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        body = str(state['n']).encode()\n"
    "        self.send_response(200); self.end_headers(); self.wfile.write(body)\n"
    "    def do_POST(self):\n"
    "        state['n'] += 1; self.do_GET()\n"
    "    def log_message(self, *a): pass\n"
    "http.server.HTTPServer(('', int(sys.argv[1])), H).serve_forever()\n"
)


def http(guest: Guest, port: int, method: str = "GET") -> int:
    """Ask the HTTP_STATE server in the guest; returns its counter."""
    out = guest.run("python3", "-c",
                    "import sys, urllib.request\n"
                    "r = urllib.request.Request(sys.argv[1], method=sys.argv[2],"
                    " data=b'' if sys.argv[2] == 'POST' else None)\n"
                    "print(urllib.request.urlopen(r, timeout=10).read().decode())",
                    f"http://127.0.0.1:{port}/", method)
    return int(out)


def wait_http(guest: Guest, port: int) -> None:
    """Until the HTTP server on ``port`` answers."""
    guest.sh(f"for i in $(seq 150); do python3 -c \"import urllib.request;"
             f" urllib.request.urlopen('http://127.0.0.1:{port}/')\" 2>/dev/null && exit 0;"
             " sleep 0.2; done; exit 1")


def start_service(guest: Guest, unit: str, *argv: str) -> int:
    guest.run("systemd-run", f"--unit={unit}", *argv)
    return int(guest.run("systemctl", "show", "-P", "MainPID", unit))


def memory_report(guest: Guest, pid: int) -> str:
    """Ask BIG_MEMORY (by PID) for its PID and its memory's SHA-256."""
    guest.run("rm", "-f", "/root/big.sum")
    guest.run("kill", "-USR1", str(pid))
    # Hashing 256 MiB takes seconds under TCG.
    guest.sh("for i in $(seq 240); do test -s /root/big.sum && exit 0; sleep 0.5; done; exit 1")
    return guest.run("cat", "/root/big.sum")


def pipe_count(guest: Guest) -> int:
    return read_counter(guest, "/root/pipe.last")

#: A TCP echo server on 127.0.0.1:PORT, a thread per connection.
ECHO_SERVER = (
    "import socket, sys, threading\n"
    "s = socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "def serve(c):\n"
    "    while data := c.recv(4096):\n"
    "        c.sendall(data)\n"
    "while True:\n"
    "    c, _ = s.accept()\n"
    "    threading.Thread(target=serve, args=(c,), daemon=True).start()\n"
)

#: One connection to the echo server on PORT, kept: every 0.1 s a numbered line there
#: and back; the count of good round trips goes to FILE. Exits if the echo is wrong or
#: the connection breaks.
ECHO_CLIENT = (
    "import os, socket, sys, time\n"
    "c = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
    "n = 0\n"
    "while True:\n"
    "    line = b'%d\\n' % n\n"
    "    c.sendall(line)\n"
    "    got = b''\n"
    "    while len(got) < len(line):\n"
    "        part = c.recv(64)\n"
    "        if not part:\n"
    "            sys.exit('the connection was closed')\n"
    "        got += part\n"
    "    if got != line:\n"
    "        sys.exit(f'echo lost: {got!r}')\n"
    "    n += 1\n"
    "    open(sys.argv[2] + '.tmp', 'w').write(str(n))\n"
    "    os.replace(sys.argv[2] + '.tmp', sys.argv[2])\n"
    "    time.sleep(0.1)\n"
)


#: The port of the HTTP server the upgrade tests run (HTTP_STATE).
PORT = 8080


def start_web_unit(g: Guest) -> int:
    """The HTTP server as a service with a unit file, enabled: systemd would start it at
    boot (so a second copy would show)."""
    g.channel.run(["sh", "-c", "cat > /usr/local/lib/web.py"], input=HTTP_STATE.encode(),
                  check=True)
    g.channel.run(["sh", "-c", "cat > /etc/systemd/system/web.service"],
                  input=WEB_UNIT_FILE.encode(), check=True)
    g.run("systemctl", "enable", "--now", "web.service")
    wait_http(g, PORT)
    return main_pid(g, "web.service")


#: The unit runs the server from a file: a one-line -c program cannot hold classes.
WEB_UNIT_FILE = f"""\
[Unit]
Description=HTTP server holding state in memory

[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/web.py {PORT}

[Install]
WantedBy=multi-user.target
"""


def main_pid(g: Guest, unit: str) -> int:
    return int(g.run("systemctl", "show", "-P", "MainPID", unit))
