"""A stand-in for the chiller app: the same image serves the frontend and the
API (ROLE), and the frontend calls the API, so traffic reaches both."""

import os
import urllib.request

from flask import Flask, jsonify

app = Flask(__name__)
ROLE = os.environ.get("ROLE", "api")
API_URL = os.environ.get("API_URL", "http://api:8000/api/items")


@app.get("/")
def index():
    if ROLE == "frontend":
        with urllib.request.urlopen(API_URL, timeout=5) as response:
            items = response.read().decode()
        return f"frontend: {items}\n"
    return "api\n"


@app.get("/api/items")
def items():
    return jsonify(items=["ice", "snow"])


@app.get("/healthz")
def healthz():
    return "ok\n"
