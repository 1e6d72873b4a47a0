"""The baseline for API latency: a bare FastAPI endpoint returning a job-sized JSON body, no auth, no database."""
from fastapi import FastAPI

app = FastAPI()
BODY = {"id": "job_0", "object": "job", "status": "running", "progress": {"fraction": 0.5}, "spec": {"x": list(range(40))}}


@app.get("/job")
def job():
    return BODY
