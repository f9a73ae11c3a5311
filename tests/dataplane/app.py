"""A tiny Flask app for the data-plane test: one route per status class."""

from flask import Flask

app = Flask(__name__)


@app.get("/")
def ok():
    return "ok\n"


@app.get("/missing")
def missing():
    return "not here\n", 404


@app.get("/fail")
def fail():
    return "failed\n", 500
