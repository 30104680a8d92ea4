"""``--backend emulated``: the real state machine on moto, with the real handlers in this process.

moto's Step Functions interpreter (ported from LocalStack) executes
``statemachine/cai.asl.json`` as written: Task retries and catches, the
Distributed Map with its S3 JSON ItemReader, ``MaxConcurrencyPath`` and
``ItemSelector``. Its Lambda tasks call moto's Lambda, whose ``invoke`` is
patched here to call the Python handler registered for that function name.
Handlers reach moto's S3 through ``AWS_ENDPOINT_URL``.

How it fits together (all in this process)::

    ThreadedMotoServer 127.0.0.1:<free port>   <- MOTO_PORT, AWS_ENDPOINT_URL(_S3)
      stepfunctions (parser backend) --HTTP--> lambda invoke --patched--> handler(event, context)
                                                                            \\-> boto3 s3 --HTTP--> moto S3

Why a threaded server and not ``mock_aws``: the interpreter runs each
execution and each Map worker in its own thread, and reaches Lambda and S3
through a boto3 client aimed at ``localhost:$MOTO_PORT`` whenever no
``mock_aws`` is active. A real socket gives the handlers the same wire
protocol and endpoint handling they have on AWS (``AWS_ENDPOINT_URL_S3``
honoured or not), works from other processes (the ``aws`` CLI, a debugger),
and port 0 lets the OS pick a free port without a race.

Known limitations (moto 5.2.1; checked against our ASL)
-------------------------------------------------------
Supported as on AWS: ``MaxConcurrencyPath``, ``ItemSelector`` with
``$$.Map.Item.Value``, ``ResultSelector``, ``OutputPath``, ``ResultPath: null``,
``Label``, Retry with ``JitterStrategy``, Catch to a Fail state or to the next Task.

- ``ToleratedFailurePercentage``/``Count`` are parsed and ignored: moto's
  Distributed Map *always* tolerates failed items (a failed item yields no
  output and the Map succeeds). Same outcome as our ``100.0``; a lower
  threshold would not fail the Map here. Any integer value (``0``, ``100``)
  fails to parse; ``100.0`` loads.
- Item failures therefore never reach the Map's ``Catch``; only an
  ItemReader or ``MaxConcurrencyPath`` failure does. An unreadable work list
  arrives as ``States.Runtime`` (AWS: ``States.ItemReaderFailed``).
- Map items run as threads inside the parent execution, not as child
  executions: their events are missing from the execution history. Use
  :attr:`EmulatedAWS.invocations` to see each item's Lambda call.
- ``States.ALL`` catches everything in moto; on AWS it does not catch
  ``States.DataLimitExceeded``/``States.Runtime``.
- Handlers run in threads of one process: environment variables, ``/tmp``,
  module globals and the root logger are shared across "Lambdas" (two executors
  may download the same file into the same cache path at once), peak-RSS
  figures are the whole process's, timeouts are not enforced while running (an
  overrun is reported afterwards as ``Sandbox.Timedout``) and memory is not limited.
- One :class:`EmulatedAWS` per process at a time (moto's state, the config it
  reads and the environment are process-wide); a second one raises
  :class:`EmulatorError`. Do not mix with an active ``mock_aws``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import traceback
import uuid
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from cai import paths
from cai.errors import CaiError

MOTO_VERSION = "5.2.1"

try:
    import moto
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"--backend emulated needs moto: pip install 'moto[s3,stepfunctions,awslambda,server]=={MOTO_VERSION}'"
    ) from exc

# NOTE: the invoke hook below patches moto internals; another version may move them.
if moto.__version__ != MOTO_VERSION:
    raise ImportError(
        f"--backend emulated hooks moto {MOTO_VERSION} internals but moto {moto.__version__} is installed: "
        f"pip install 'moto[s3,stepfunctions,awslambda,server]=={MOTO_VERSION}'"
    )

import boto3  # noqa: E402
from moto.awslambda_simple.models import LambdaSimpleBackend, lambda_simple_backends  # noqa: E402
from moto.core.config import default_user_config  # noqa: E402
from moto.iam.models import iam_backends  # noqa: E402
from moto.logs.models import logs_backends  # noqa: E402
from moto.s3.models import s3_backends  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402
from moto.stepfunctions.parser.backend.execution import Execution as ParserExecution  # noqa: E402
from moto.stepfunctions.parser.models import stepfunctions_parser_backends  # noqa: E402

LOG = logging.getLogger(__name__)

DEFAULT_ASL_PATH = paths.STATE_MACHINE
DEFAULT_REGION = "us-east-1"

# Step Functions rejects a state input/output over 256 KiB (States.DataLimitExceeded).
STATE_PAYLOAD_LIMIT_BYTES = 256 * 1024

Handler = Callable[[Any, "LambdaContext"], Any]


# the deployment fills it with the stack's bucket (serverless.yml, DefinitionSubstitutions)
BUCKET_PLACEHOLDER = "${CaiBucketName}"
DEFAULT_BUCKET = "cai-emulated"


class EmulatorError(CaiError):
    """The emulator could not start, or an execution did not finish in time."""


@dataclass
class Invocation:
    """One emulated Lambda call, for tests and timing reports."""

    function_name: str
    request_id: str
    started_s: float  # time.monotonic()
    duration_s: float
    error_type: str | None = None
    error_message: str | None = None


class LambdaContext:
    """What the Python Lambda runtime (awslambdaric) passes as ``context``.

    NOTE: ``memory_limit_in_mb`` is a string, as in the real runtime (it is read
    from an environment variable there); handlers should ``int()`` it.
    """

    def __init__(self, function_name: str, function_arn: str, memory_mb: int, timeout_s: float):
        self.aws_request_id = str(uuid.uuid4())
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = function_arn
        self.memory_limit_in_mb = str(memory_mb)
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = time.strftime("%Y/%m/%d") + "/[$LATEST]" + self.aws_request_id.replace("-", "")
        self.client_context = None
        self.identity = None
        self._deadline_ms = int(time.time() * 1000 + timeout_s * 1000)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self._deadline_ms - int(time.time() * 1000))

    def __repr__(self) -> str:
        return f"LambdaContext(function_name={self.function_name!r}, aws_request_id={self.aws_request_id!r})"


# The one running emulator; the patched invoke reads it. Guarded by _ACTIVE_LOCK.
_ACTIVE: EmulatedAWS | None = None
_ACTIVE_LOCK = threading.Lock()
_ORIGINAL_INVOKE = LambdaSimpleBackend.invoke


def _bare_function_name(function_name: str) -> str:
    # invoke gets whatever the caller put in the URL: a name, or an ARN with optional qualifier
    if ":function:" in function_name:
        return function_name.split(":function:", 1)[1].split(":", 1)[0]
    return function_name


def _patched_invoke(backend, function_name, qualifier, body, headers, response_headers):
    """Stands in for ``moto.awslambda_simple.models.LambdaSimpleBackend.invoke``."""
    emulator = _ACTIVE
    name = _bare_function_name(function_name)
    if emulator is None or name not in emulator.handlers:
        return _ORIGINAL_INVOKE(backend, function_name, qualifier, body, headers, response_headers)
    payload, function_error = emulator._call_handler(name, body)
    if function_error:
        # what real Lambda sends for an uncaught exception; the interpreter turns it into a task failure
        response_headers["x-amz-function-error"] = "Unhandled"
    return payload


class EmulatedAWS:
    """moto S3, Lambda and Step Functions running ``asl_path`` with ``handlers`` as the Lambdas.

    Use it as a context manager::

        with EmulatedAWS({"initialize": init, "cosmicExecutor": execute, "summarize": summarize},
                         buckets=["cai-data"]) as aws:
            aws.s3.upload_file(...)
            status, result = aws.wait(aws.start(payload), timeout_s=600)

    Args:
        handlers: Lambda function name -> ``handler(event, context)``. Each name
            fills the ASL placeholder ``${<Name>FunctionArn}`` (first letter upper-cased).
        asl_path: the state machine definition, placeholders unfilled.
        buckets: buckets to create (default ``cai-emulated``); the first is the stack's bucket,
            which fills the ASL placeholder ``${CaiBucketName}`` (the Map's ResultWriter), as the
            deployment does.
        region: region of every resource and of the handlers' clients.
        memory_mb: each function's configured memory, as the context reports it.
        timeout_s: each function's timeout; a handler that runs longer is
            reported as a ``Sandbox.Timedout`` failure once it returns.
        environment: extra environment variables for the duration (shared by all handlers).
        state_machine_name: name of the created state machine.

    Environment variables set for the duration and restored afterwards:
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
    ``AWS_DEFAULT_REGION``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``,
    ``AWS_ENDPOINT_URL_S3``, ``MOTO_PORT``, ``NO_PROXY``; ``AWS_CONFIG_FILE`` and
    ``AWS_SHARED_CREDENTIALS_FILE`` point nowhere, and ``AWS_PROFILE`` and any
    other ``AWS_ENDPOINT_URL_*`` are removed, so nothing can reach real AWS.

    Raises:
        EmulatorError: another EmulatedAWS is running, the ASL file is missing or
            names a function without a handler.
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        asl_path: str | os.PathLike = DEFAULT_ASL_PATH,
        buckets: Iterable[str] = (),
        *,
        region: str = DEFAULT_REGION,
        memory_mb: int = 10240,
        timeout_s: float = 900,
        environment: Mapping[str, str] | None = None,
        state_machine_name: str = "cai",
    ):
        self.handlers = dict(handlers)
        self.asl_path = Path(asl_path)
        self.buckets = list(buckets) or [DEFAULT_BUCKET]  # a stack always has its bucket
        self.region = region
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self.environment = dict(environment or {})
        self.state_machine_name = state_machine_name

        self.endpoint_url: str | None = None
        self.function_arns: dict[str, str] = {}
        self.state_machine_arn: str | None = None
        self.s3 = None
        self.sfn = None

        self._entered = False
        self._server: ThreadedMotoServer | None = None
        self._patches: list[Any] = []
        self._log_levels: list[tuple[logging.Logger, int]] = []
        self._saved_env: dict[str, str | None] = {}
        self._saved_session = None
        self._stats_lock = threading.Lock()
        self._invocations: list[Invocation] = []
        self._running: dict[str, int] = {}
        self._peak: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> EmulatedAWS:
        global _ACTIVE
        if not _ACTIVE_LOCK.acquire(blocking=False):
            raise EmulatorError("another EmulatedAWS is already running in this process",
                                "moto's state is process-wide: leave the first one before starting another")
        self._entered = True
        self._saved_session = boto3.DEFAULT_SESSION
        try:
            self._start()
            _ACTIVE = self
            self._create_resources()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop()

    def _start(self) -> None:
        self._read_definition()  # a bad path or a missing handler fails before anything global changes

        # the parser backend executes ASL; the no-docker Lambda backend is the one we patch
        self._patches = [
            mock.patch.dict(default_user_config["stepfunctions"], {"execute_state_machine": True}),
            mock.patch.dict(default_user_config["lambda"], {"use_docker": False}),
            mock.patch.object(LambdaSimpleBackend, "invoke", _patched_invoke),
            # Maintenance: moto 5.2.1 deep-copies the state machine, and through it every past execution
            # with its live thread and lock, on each StartExecution, so the second one fails with
            # "cannot pickle '_thread.RLock'" (getmoto/moto#10077). Copying an execution as itself
            # sidesteps it; retire with a moto that has the fix (getmoto/moto#10093).
            mock.patch.object(ParserExecution, "__deepcopy__", lambda execution, memo: execution, create=True),
        ]
        for patch in self._patches:
            patch.start()
        _reset_moto_services()

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        self._set_environment(port)

        # werkzeug logs every request at INFO, and the interpreter logs each failure it handles with a
        # repr of the whole state: wait() reports failures, so both stay quiet unless we log at DEBUG
        if not LOG.isEnabledFor(logging.DEBUG):
            self._quiet("werkzeug", logging.WARNING)
            self._quiet("moto.stepfunctions.parser", logging.CRITICAL)
            self._quiet("botocore", logging.WARNING)  # "Found credentials ..." once per handler client
            # the interpreter's Map threads share clients of 10 pooled connections; a discarded extra
            # connection costs nothing, but urllib3 warns of each one
            self._quiet("urllib3.connectionpool", logging.ERROR)

        # a cached default session may hold credentials or a region from before
        boto3.DEFAULT_SESSION = None
        self.s3 = boto3.client("s3", region_name=self.region, endpoint_url=self.endpoint_url)
        self.sfn = boto3.client("stepfunctions", region_name=self.region, endpoint_url=self.endpoint_url)

    def _stop(self) -> None:
        global _ACTIVE
        if not self._entered:
            return
        self._entered = False
        try:
            self._stop_running_executions()
            if self._server is not None:
                self._server.stop()
                self._server = None
            _reset_moto_services()
        finally:
            for patch in reversed(self._patches):
                patch.stop()
            self._patches = []
            for logger, level in reversed(self._log_levels):
                logger.setLevel(level)
            self._log_levels = []
            self._restore_environment()
            boto3.DEFAULT_SESSION = self._saved_session
            self._saved_session = None
            _ACTIVE = None
            _ACTIVE_LOCK.release()

    def _quiet(self, logger_name: str, level: int) -> None:
        logger = logging.getLogger(logger_name)
        self._log_levels.append((logger, logger.level))
        logger.setLevel(max(logger.getEffectiveLevel(), level))

    def _stop_running_executions(self) -> None:
        # leftover executions would keep calling a server that is about to go
        if self.sfn is None or self.state_machine_arn is None:
            return
        try:
            running = self.sfn.list_executions(stateMachineArn=self.state_machine_arn,
                                               statusFilter="RUNNING")["executions"]
            for execution in running:
                self.sfn.stop_execution(executionArn=execution["executionArn"], error="Emulator.Stopped",
                                        cause="the emulator was shut down while the execution ran")
        except Exception:  # best effort on the way out
            LOG.debug("could not stop running executions", exc_info=True)

    def _set_environment(self, port: int) -> None:
        values = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            # the interpreter's own clients go to localhost:$MOTO_PORT
            "MOTO_PORT": str(port),
            **self.environment,
        }
        for name in ("NO_PROXY", "no_proxy"):
            # a corporate proxy must not swallow calls to 127.0.0.1
            values[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"]))
        removed = [k for k in os.environ if k.startswith("AWS_ENDPOINT_URL_") and k not in values]
        removed += ["AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"]
        for name in [*values, *removed]:
            self._saved_env.setdefault(name, os.environ.get(name))
        for name in removed:
            os.environ.pop(name, None)
        os.environ.update(values)

    def _restore_environment(self) -> None:
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}

    # -- resources ---------------------------------------------------------

    def _read_definition(self) -> str:
        if not self.asl_path.is_file():
            raise EmulatorError(f"state machine definition not found: {self.asl_path}",
                                "pass asl_path= the statemachine/cai.asl.json of a checkout")
        definition = self.asl_path.read_text()
        missing = [name for name in _placeholders(definition) if _handler_for(name, self.handlers) is None]
        if missing:
            raise EmulatorError(f"{self.asl_path.name} needs functions with no handler: {', '.join(missing)}",
                                f"handlers given: {', '.join(sorted(self.handlers)) or 'none'}")
        return definition

    def _create_resources(self) -> None:
        for bucket in self.buckets:
            self.s3.create_bucket(Bucket=bucket)

        iam = boto3.client("iam", region_name=self.region, endpoint_url=self.endpoint_url)
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "sts:AssumeRole",
            "Principal": {"Service": ["lambda.amazonaws.com", "states.amazonaws.com"]}}]}
        role_arn = iam.create_role(RoleName="cai-emulated", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]

        # moto's no-docker Lambda never runs the code, but create_function wants a zip
        code = io.BytesIO()
        with zipfile.ZipFile(code, "w") as archive:
            archive.writestr("emulated.py", "def handler(event, context):\n    raise RuntimeError('emulated')\n")
        lambda_client = boto3.client("lambda", region_name=self.region, endpoint_url=self.endpoint_url)
        for name in self.handlers:
            created = lambda_client.create_function(
                FunctionName=name, Runtime="python3.12", Role=role_arn, Handler="emulated.handler",
                Code={"ZipFile": code.getvalue()}, MemorySize=self.memory_mb, Timeout=int(self.timeout_s))
            self.function_arns[name] = created["FunctionArn"]

        definition = self._read_definition()
        for placeholder in _placeholders(definition):
            arn = self.function_arns[_handler_for(placeholder, self.handlers)]
            definition = definition.replace("${" + placeholder + "}", arn)
        definition = definition.replace(BUCKET_PLACEHOLDER, self.buckets[0])
        try:
            self.state_machine_arn = self.sfn.create_state_machine(
                name=self.state_machine_name, definition=definition, roleArn=role_arn)["stateMachineArn"]
        except self.sfn.exceptions.ClientError as exc:
            raise EmulatorError(f"moto cannot load {self.asl_path}: {exc.response['Error'].get('Message') or exc}",
                                "moto's parser is stricter than AWS in places: an integer "
                                "ToleratedFailurePercentage (100) fails where 100.0 loads") from exc

    # -- executions --------------------------------------------------------

    def start(self, payload: Any, name: str | None = None) -> str:
        """Start an execution with ``payload`` as its input; return its ARN."""
        # moto names an unnamed execution "None", so a second one would clash: AWS uses a UUID
        return self.sfn.start_execution(stateMachineArn=self.state_machine_arn, name=name or str(uuid.uuid4()),
                                        input=json.dumps(payload))["executionArn"]

    def wait(self, execution_arn: str, timeout_s: float = 900, poll_s: float = 0.05) -> tuple[str, Any]:
        """Wait for an execution to end.

        Returns:
            ``(status, detail)``. ``SUCCEEDED``: detail is the decoded output.
            Otherwise a dict with ``error`` and ``cause`` of the execution,
            ``failed_state`` (the state that ended it) and ``task_failures``
            (``{"state", "error", "cause"}`` for every failed task in the history).

        Raises:
            EmulatorError: still running after ``timeout_s`` (it keeps running
                until waited for again or the emulator is left).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            described = self.sfn.describe_execution(executionArn=execution_arn)
            if described["status"] != "RUNNING":
                break
            if time.monotonic() > deadline:
                raise EmulatorError(f"execution still running after {timeout_s:g} s: {execution_arn}",
                                    "raise timeout_s, or look at invocations for a stuck handler")
            time.sleep(poll_s)

        status = described["status"]
        if status == "SUCCEEDED":
            return status, json.loads(described.get("output") or "null")
        failed_state, task_failures = _failures(self.history(execution_arn))
        return status, {"error": described.get("error"), "cause": described.get("cause"),
                        "failed_state": failed_state, "task_failures": task_failures}

    def history(self, execution_arn: str) -> list[dict]:
        """Every event of the execution's history, oldest first (Map items are not in it)."""
        events, kwargs = [], {}
        while True:
            page = self.sfn.get_execution_history(executionArn=execution_arn, maxResults=1000, **kwargs)
            events += page["events"]
            if not page.get("nextToken"):
                return events
            kwargs = {"nextToken": page["nextToken"]}

    @property
    def invocations(self) -> list[Invocation]:
        """Every handler call so far, in the order they ended."""
        with self._stats_lock:
            return list(self._invocations)

    def peak_concurrency(self, function_name: str) -> int:
        """Most calls of ``function_name`` that ran at the same time."""
        with self._stats_lock:
            return self._peak.get(function_name, 0)

    # -- the Lambda side ---------------------------------------------------

    def _call_handler(self, name: str, body: Any) -> tuple[bytes, bool]:
        """Run a handler as Lambda would; return (response payload, whether it is a function error)."""
        context = LambdaContext(name, self.function_arns.get(name, name), self.memory_mb, self.timeout_s)
        with self._stats_lock:
            self._running[name] = self._running.get(name, 0) + 1
            self._peak[name] = max(self._peak.get(name, 0), self._running[name])
        started = time.monotonic()
        error = None
        try:
            event = json.loads(body) if body else {}
            result = self.handlers[name](event, context)
            try:
                payload = json.dumps(result).encode()
            except (TypeError, ValueError) as exc:
                error = ("Runtime.MarshalError", f"Unable to marshal response: {exc}", [])
            else:
                if len(payload) > STATE_PAYLOAD_LIMIT_BYTES:
                    # AWS fails the state itself; reported as the task's error so the run still stops
                    error = ("States.DataLimitExceeded",
                             f"{name} returned {len(payload)} bytes; Step Functions accepts at most "
                             f"{STATE_PAYLOAD_LIMIT_BYTES} per state", [])
        except SystemExit as exc:
            error = ("Runtime.ExitError", f"RequestId: {context.aws_request_id} Error: exited with {exc.code}", [])
        except Exception as exc:
            # from the handler's frame down, as Lambda shows it
            error = (type(exc).__name__, str(exc), traceback.format_tb(exc.__traceback__.tb_next))
            LOG.warning("emulated %s raised %s: %s", name, type(exc).__name__, exc)
        duration_s = time.monotonic() - started
        if error is None and duration_s > self.timeout_s:
            error = ("Sandbox.Timedout", f"Task timed out after {self.timeout_s:.2f} seconds", [])

        with self._stats_lock:
            self._running[name] -= 1
            self._invocations.append(Invocation(name, context.aws_request_id, started, duration_s,
                                                *(error[:2] if error else (None, None))))
        if error is None:
            return payload, False
        error_type, message, stack = error
        return json.dumps({"errorMessage": message, "errorType": error_type,
                           "requestId": context.aws_request_id, "stackTrace": stack}).encode(), True


@dataclass
class EmulatedRun:
    """What :func:`run_state_machine` returns."""

    status: str  # SUCCEEDED, FAILED, TIMED_OUT or ABORTED
    output: Any  # the state machine's output when SUCCEEDED, else None
    failure: dict | None  # wait()'s failure detail when not SUCCEEDED
    execution_arn: str
    elapsed_s: float
    invocations: list[Invocation] = field(default_factory=list)
    peak_concurrency: dict[str, int] = field(default_factory=dict)  # function name -> most calls at once
    downloaded: Any = None  # whatever download() returned

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"


def run_state_machine(
    payload: Any,
    handlers: Mapping[str, Handler],
    asl_path: str | os.PathLike = DEFAULT_ASL_PATH,
    buckets: Iterable[str] = (),
    upload: Callable[[EmulatedAWS], Any] | None = None,
    download: Callable[[EmulatedAWS], Any] | None = None,
    timeout_s: float = 3600,
    *,
    memory_mb: int = 10240,
    function_timeout_s: float = 900,
    environment: Mapping[str, str] | None = None,
) -> EmulatedRun:
    """Start an :class:`EmulatedAWS`, run one execution with ``payload``, and tear it down.

    Args:
        payload: the execution input (the run payload Initialize validates).
        handlers: Lambda function name -> ``handler(event, context)``.
        asl_path: the state machine definition.
        buckets: buckets to create before ``upload``.
        upload: called with the emulator before the run, to put inputs into
            its S3 (``emulator.s3`` or any ``boto3.client("s3")``).
        download: called with the emulator after the run, whatever its
            status, while moto's S3 still holds the results; its return value
            is ``EmulatedRun.downloaded``.
        timeout_s: how long to wait for the execution.
        memory_mb, function_timeout_s, environment: as ``memory_mb``, ``timeout_s``
            and ``environment`` of :class:`EmulatedAWS`.

    Raises:
        EmulatorError: see :class:`EmulatedAWS` and :meth:`EmulatedAWS.wait`.
    """
    with EmulatedAWS(handlers, asl_path, buckets, memory_mb=memory_mb, timeout_s=function_timeout_s,
                     environment=environment) as aws:
        if upload is not None:
            upload(aws)
        started = time.monotonic()
        execution_arn = aws.start(payload)
        status, detail = aws.wait(execution_arn, timeout_s=timeout_s)
        elapsed_s = time.monotonic() - started
        downloaded = download(aws) if download is not None else None
        succeeded = status == "SUCCEEDED"
        return EmulatedRun(status=status, output=detail if succeeded else None,
                           failure=None if succeeded else detail, execution_arn=execution_arn,
                           elapsed_s=elapsed_s, invocations=aws.invocations,
                           peak_concurrency={name: aws.peak_concurrency(name) for name in aws.handlers},
                           downloaded=downloaded)


def run_pipeline(partitions: str | os.PathLike, model_path: str | os.PathLike, settings: Mapping[str, Any],
                 *, max_concurrency: int | None = None, timeout_s: float = 3600) -> tuple[dict, bytes]:
    """``cai run --backend emulated``: the real handlers under the real state machine, on moto.

    Uploads the partition folder and the model to an emulated bucket, runs one
    execution and returns ``(summary, predictions.csv bytes)`` like the local backend.

    Args:
        partitions: folder of partitions (as ``cai.run.prepare_partitions`` makes).
        model_path: the model file the executors load.
        settings: run payload fields (batch_size, runtime, max_partitions, ...).
        max_concurrency: Map concurrency; default one executor per core, since
            the emulated Lambdas are threads of this process.
        timeout_s: how long to wait for the execution.

    Raises:
        EmulatorError: the execution failed; names the failing state and each task error.
    """
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    partitions, model_path = Path(partitions), Path(model_path)
    bucket, result_prefix = "cai-emulated", "runs/emulated/"
    cores = os.cpu_count() or 1
    concurrency = max_concurrency or cores
    payload = {"bucket": bucket, "partition_prefix": "partitions/", "model_key": f"models/{model_path.name}",
               "result_prefix": result_prefix, "max_concurrency": concurrency,
               "threads": max(1, cores // concurrency), **settings}

    def upload(aws: EmulatedAWS) -> None:
        files = [(str(p), "partitions/" + p.relative_to(partitions).as_posix())
                 for p in sorted(partitions.rglob("*")) if p.is_file()]
        files.append((str(model_path), payload["model_key"]))
        # many small partitions: one request at a time would dominate a short run
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda pair: aws.s3.upload_file(pair[0], bucket, pair[1]), files))

    def download(aws: EmulatedAWS) -> bytes | None:
        try:
            return aws.s3.get_object(Bucket=bucket, Key=result_prefix + "predictions.csv")["Body"].read()
        except aws.s3.exceptions.NoSuchKey:
            return None

    handlers = real_handlers()
    # a fresh model cache: /tmp/cai-model would otherwise serve a stale model from an earlier run;
    # LOG_LEVEL: each handler sets the (shared) root level from it, which must not undo the CLI's -v
    with tempfile.TemporaryDirectory(prefix="cai-emulated-") as cache:
        environment = {"CAI_MODEL_CACHE_DIR": cache,
                       "LOG_LEVEL": logging.getLevelName(logging.getLogger().getEffectiveLevel())}
        run = run_state_machine(payload, handlers, buckets=[bucket], upload=upload, download=download,
                                timeout_s=timeout_s, environment=environment)
    if not run.succeeded:
        failure = run.failure
        tasks = "; ".join(f"{t['state']}: {t['error']}: {_error_message(t['cause'])}"
                          for t in failure["task_failures"])
        raise EmulatorError(f"emulated run {run.status} at {failure['failed_state']}: "
                            f"{failure['error']} ({tasks or failure['cause']})",
                            "the same payload fails the same way on AWS; fix the named problem")
    if run.downloaded is None:
        raise EmulatorError(f"the run succeeded but Summarize wrote no s3://{bucket}/{result_prefix}predictions.csv",
                            "see Summarize's log lines above")
    return run.output, run.downloaded


def real_handlers() -> dict[str, Handler]:
    """The Lambda entry points in ``handlers/``, by function name."""
    import importlib
    import importlib.util
    import sys

    modules = {"initialize": "initialize", "cosmicExecutor": "cosmic_executor", "summarize": "summarize"}
    folder = paths.HANDLERS
    found = {}
    for function_name, module in modules.items():
        try:
            found[function_name] = importlib.import_module(f"handlers.{module}").handler
            continue
        except ModuleNotFoundError as exc:
            if exc.name not in ("handlers", f"handlers.{module}"):
                raise
        # `cai` run from another folder: handlers/ is not on sys.path, but sits beside cai/ in a checkout
        path = folder / f"{module}.py"
        if not path.is_file():
            raise EmulatorError(f"no Lambda handler {path}", "run the emulated backend from a checkout of CAI")
        spec = importlib.util.spec_from_file_location(f"handlers.{module}", path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(spec.name, loaded)
        spec.loader.exec_module(loaded)
        found[function_name] = loaded.handler
    return found


def _error_message(cause: str | None) -> str | None:
    # a Lambda task's cause is its JSON error payload; the message is what a person reads
    try:
        return json.loads(cause)["errorMessage"]
    except (TypeError, ValueError, KeyError):
        return cause


def _placeholders(definition: str) -> list[str]:
    """``${XFunctionArn}`` names in a definition, in order of first use."""
    names: list[str] = []
    start = definition.find("${")
    while start != -1:
        end = definition.find("}", start)
        name = definition[start + 2:end]
        if name.endswith("FunctionArn") and name not in names:
            names.append(name)
        start = definition.find("${", end)
    return names


def _handler_for(placeholder: str, handlers: Mapping[str, Handler]) -> str | None:
    """The function name that fills ``placeholder``: CosmicExecutorFunctionArn -> cosmicExecutor."""
    stem = placeholder[: -len("FunctionArn")]
    for name in handlers:
        if name[:1].upper() + name[1:] == stem:
            return name
    return None


def _failures(events: list[dict]) -> tuple[str | None, list[dict]]:
    """The state that ended a failed execution, and every failed task with its state."""
    state, failed_state, failures = None, None, []
    for event in events:
        entered = event.get("stateEnteredEventDetails")
        if entered:
            state = entered["name"]
        details = event.get("taskFailedEventDetails") or event.get("lambdaFunctionFailedEventDetails")
        if details:
            failures.append({"state": state, "error": details.get("error"), "cause": details.get("cause")})
        if event["type"] in ("ExecutionFailed", "ExecutionAborted", "ExecutionTimedOut"):
            failed_state = state
    return failed_state, failures


def _reset_moto_services() -> None:
    # only the services the emulator uses, so leftovers of one run never leak into the next
    for backends in (s3_backends, lambda_simple_backends, iam_backends, stepfunctions_parser_backends, logs_backends):
        for account_backends in list(backends.values()):
            account_backends.reset()
