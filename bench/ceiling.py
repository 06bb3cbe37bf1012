"""The ceiling of the stack: a bare Flask app answering a constant.

Run by bench/run.sh under the gateway's own gunicorn settings
(``gunicorn -c gunicorn.conf.py bench.ceiling:app``), so the gateway's
throughput can be read as a fraction of what Flask + gunicorn can do at all.
"""

from flask import Flask

app = Flask(__name__)

BODY = b'{"message": "Hello from the Service!"}'


@app.route("/", defaults={"path": ""})
@app.route("/<path:path>")
def constant(path: str):
    return BODY, 200, {"Content-Type": "application/json"}
