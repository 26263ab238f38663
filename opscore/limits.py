"""Every limit the server enforces at its edge, in one place.

The proto comments quote these numbers; validation and tests import them from
here, so a limit changes in one line. Durations and times are bounded so that
every deadline the server computes stays far inside what datetime and int64
microseconds can hold, whatever a client sends.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

# ---- identifiers and strings
MAX_ID_CHARS = 128
MAX_NAME_CHARS = 256
MAX_IDEMPOTENCY_KEY_CHARS = 256
MAX_REASON_CHARS = 1024
MAX_ERROR_MESSAGE_CHARS = 4096
MAX_PAGE_TOKEN_CHARS = 512

# ---- payloads (google.protobuf.Struct, measured serialized)
MAX_PAYLOAD_BYTES = 1024 * 1024  # task input, output, session input
MAX_DETAILS_BYTES = 64 * 1024  # state details, error details, progress
# Nesting of Struct/ListValue levels inside one payload. protobuf's decoders stop
# at 100 message levels and each Struct level costs three (Struct, map entry,
# Value); a workflow nests outputs two levels further down inside an assignment.
# 24 keeps every accepted payload decodable by every client in every message.
MAX_PAYLOAD_DEPTH = 24
# A workflow task's composed input (parameters + session input + upstream
# outputs). Kept under gRPC's default 4 MiB receive limit so that an agent in
# any language with default settings can receive the assignment.
MAX_COMPOSED_INPUT_BYTES = 3 * 1024 * 1024

# ---- messages (gRPC)
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# ---- durations
MAX_TASK_TIMEOUT = timedelta(days=30)  # timeout, heartbeat_timeout
MAX_DELAY = timedelta(days=365)  # delay, and how far ahead schedule_time may be
MAX_BACKOFF = timedelta(days=1)  # initial_backoff, max_backoff
MAX_BACKOFF_MULTIPLIER = 100.0
MAX_ATTEMPTS = 100
# Workflow definition versions are int32 on the wire.
MAX_DEFINITION_VERSION = 2**31 - 1
# How far ahead of the server clock an agent's observe_time may be (clock skew).
MAX_CLOCK_SKEW = timedelta(minutes=5)

# ---- timestamps: google.protobuf.Timestamp's own valid range
MIN_TIMESTAMP = datetime(1, 1, 1, tzinfo=UTC)
MAX_TIMESTAMP = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
# Duration fields accept at most this many seconds before the per-field bound
# applies (the protobuf spec's own range is +-315,576,000,000 s).
MAX_DURATION_SECONDS = 315_576_000_000

# ---- batches and streams
MAX_ENQUEUE_BATCH = 1000
MAX_IN_FLIGHT = 1000
MAX_CAPABILITIES = 64
MAX_METADATA_ENTRIES = 64
DEFAULT_MAX_SUBSCRIPTIONS_PER_AGENT = 16
DEFAULT_MAX_STREAMS_PER_CONNECTION = 1000
DEFAULT_MAX_PENDING_CALLS = 20_000
# What one watcher (WatchAgents, WatchSession) may have queued before it is
# ended with RESOURCE_EXHAUSTED: a client that does not read cannot hold more.
WATCHER_MAX_EVENTS = 10_000
WATCHER_MAX_BYTES = 8 * 1024 * 1024

# ---- observability
# Distinct capability label values per metric family; tasks of further
# capabilities are counted under "(other)", so label cardinality stays bounded
# however many capabilities clients invent.
MAX_METRIC_CAPABILITIES = 500

# ---- retention (opscore/retention.py): what is older than --retention is pruned
DEFAULT_RETENTION = timedelta(days=7)
MAX_RETENTION = timedelta(days=100 * 365)
# Rows removed per transaction: small, so a prune never holds the writer (SQLite)
# or row locks (PostgreSQL) for long, and never stalls dispatch. 500 made the
# commit that carried them visibly slower for every call waiting on it.
RETENTION_BATCH_ROWS = 200
# The pause after a batch is this many times as long as the batch took (at
# least RETENTION_MIN_PAUSE), so pruning gets at most a tenth of the time: it
# drains a backlog slower, and dispatch does not notice (bench scenario 8b: a
# factor of 1 with 500 rows cost a saturated SQLite server half its throughput,
# 4 with 200 rows 12%, 9 with 200 rows 1%).
RETENTION_PAUSE_FACTOR = 9
RETENTION_MIN_PAUSE = timedelta(milliseconds=10)
# How often a pass looks for expired rows: a tenth of the period, within these.
RETENTION_MIN_INTERVAL = timedelta(milliseconds=100)
RETENTION_MAX_INTERVAL = timedelta(seconds=60)
# SQLite: free pages given back to the file system per incremental vacuum step.
RETENTION_VACUUM_PAGES = 1000
# SQLite: an existing database file made without incremental auto-vacuum is
# converted at start (one VACUUM) when it is at most this big; a bigger one is
# left to `opscore db vacuum`, run while the server is stopped.
STARTUP_VACUUM_MAX_BYTES = 64 * 1024 * 1024

# ---- workflow definitions
MAX_WORKFLOW_TASKS = 10_000
MAX_DEFINITION_SOURCE_BYTES = 2 * 1024 * 1024
# Serialized; so that GetWorkflowDefinition always fits in a default-size message.
MAX_DEFINITION_BYTES = 3 * 1024 * 1024
# YAML/JSON documents: nesting depth and the number of nodes after alias
# expansion (a "billion laughs" document is tiny but expands without bound).
MAX_SOURCE_DEPTH = 64
MAX_SOURCE_NODES = 200_000
# Problems one refused definition reports (the rest are counted: "and N more"),
# and the characters of each: a status's message and details travel as gRPC
# trailers, which clients refuse past 8-16 KiB.
MAX_REPORTED_PROBLEMS = 10
MAX_PROBLEM_CHARS = 300

# ---- authentication (opscore/security)
# An authorization header longer than this is malformed: nothing longer is hashed.
MAX_API_KEY_CHARS = 512
# Failed authentications are logged at most this many lines in a burst, then at
# this rate; the rest are counted and summed up in one line per interval.
AUTH_FAILURE_LOG_BURST = 10
AUTH_FAILURE_LOG_PER_SECOND = 1.0
AUTH_FAILURE_SUMMARY_INTERVAL = timedelta(seconds=10)
# A revoked principal's stream that is busy sending (a client that does not
# read) is cancelled after this grace; an idle one ends at once.
REVOKED_STREAM_GRACE = timedelta(milliseconds=500)
