"""``splitserve submit``: the main job as a Ray job, through Ray's JobSubmissionClient.

What it adds over a bare ``ray job submit --working-dir . -- python -m splitserve serve CONFIG``: the config is
checked here before anything is uploaded, Ray's stop timeout is raised to cover the drain (Ray's default SIGKILLs
the job 3 s after ``ray job stop``), and the configured API addresses go into the job's metadata.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from splitserve.config import load_config

# Time Ray gives the job past the drain (stopping actors, closing ports) before it sends SIGKILL.
STOP_SLACK_S = 15
# Right after `ray start` the job server answers before its node agent does; such a submission is retried this long.
AGENT_WAIT_S = 60.0
_NO_AGENT = "No available agent"


class SubmitError(ValueError):
    """A submission that cannot work as given; the message names the flag and the fix."""


@dataclass(frozen=True)
class Submission:
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]


def build_submission(config_path: str, working_dir: str, drain_timeout_s: float) -> Submission:
    """The job for ``config_path``; raises ConfigError for a bad config and SubmitError for bad paths."""
    config_file, root = Path(config_path).resolve(), Path(working_dir).resolve()
    if not root.is_dir():
        raise SubmitError(f"--working-dir: {working_dir} is not a directory")
    if not config_file.is_relative_to(root):
        raise SubmitError(
            f"CONFIG: {config_path} is outside --working-dir {working_dir}, so the job would not see it "
            "(fix: move it under the working dir, or pass --working-dir a folder that holds it)"
        )
    config = load_config(config_file)
    relative = config_file.relative_to(root).as_posix()
    server = config.server
    return Submission(
        entrypoint=f"python -m splitserve serve {shlex.quote(relative)} --drain-timeout {drain_timeout_s:g}",
        runtime_env={
            "working_dir": str(root),
            "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(int(drain_timeout_s) + STOP_SLACK_S)},
        },
        metadata={
            "splitserve_config": relative,
            # As configured, on the node the job's driver runs on; port 0 (any free port) is in the job logs only.
            "splitserve_grpc": f"{server.host}:{server.grpc_port}",
            "splitserve_http": f"{server.host}:{server.http_port}",
        },
    )


def submit(address: str, submission: Submission) -> str:
    """Submit to the Ray cluster whose dashboard is at ``address``; returns the job id."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=submission.entrypoint, runtime_env=submission.runtime_env, metadata=submission.metadata
            )
        except RuntimeError as err:
            if _NO_AGENT not in str(err) or time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def next_steps(address: str, job_id: str, submission: Submission) -> str:
    """What a person runs next, printed after a submission."""
    return "\n".join(
        [
            f"submitted splitserve job {job_id} to {address}",
            f"  follow its logs:  ray job logs --address {address} --follow {job_id}",
            f"  its status:       ray job status --address {address} {job_id}",
            f"  stop (drains):    ray job stop --address {address} {job_id}",
            f"  the cluster:      splitserve status --address {submission.metadata['splitserve_grpc']}",
        ]
    )
