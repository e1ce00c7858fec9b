"""FLARE API sessions of a provisioning's admin kits, driven by one JSON request per line on stdin, one JSON answer
per line on stdout: the researcher's or operator's laptop on a testbed's admin host.

A process outside a testbed's namespaces cannot reach its server (nothing outside can); the tests and
``bench.network`` run this on the admin host (``python -m fedseg.app.flare_agent <kits>``, ``<kits>`` holding
``<user>/startup``) and talk to it through ``AdminAgent`` (``fedseg.app.testbed_federation``).
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def main() -> int:
    kits = sys.argv[1]
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # FLARE's API prints; only answers go to the real stdout
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    sessions: dict = {}

    def session(user: str):
        if user not in sessions:
            sessions[user] = new_secure_session(user, os.path.join(kits, user), timeout=90)
        return sessions[user]

    def connected(user):
        return sorted(c.name for c in session(user).get_connected_client_list())

    def submit(user, job):
        return session(user).submit_job(job)

    def wait(user, job_id, timeout):
        _, meta = session(user).monitor_job_and_return_job_meta(job_id, timeout=timeout, poll_interval=2)
        return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}

    def download(user, job_id, destination):
        return session(user).download_job_result(job_id, destination=destination)

    def abort(user, job_id):
        session(user).abort_job(job_id)
        return True

    def close(user):
        sessions.pop(user).close()
        return True

    operations = {
        "connected": connected,
        "submit": submit,
        "wait": wait,
        "download": download,
        "abort": abort,
        "close": close,
    }
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = {"ok": operations[request["op"]](**request["args"])}
        except Exception as exc:  # the test reads the reason; the agent goes on
            traceback.print_exc()
            answer = {"error": f"{type(exc).__name__}: {exc}"}
            sessions.pop(request.get("args", {}).get("user"), None)
        print(json.dumps(answer), file=answers)
    for sess in sessions.values():
        sess.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # FLARE's API leaves non-daemon threads behind
