"""`pag serve`: a trained rewriter as a Ray Serve application (serving/app.py) -- a policy deployment with
dynamic batching, an optional render + score deployment, a FastAPI ingress with the HTTP API and a page at `/`.
The work itself is in plain classes (serving/core.py), testable without Ray."""
