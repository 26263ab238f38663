"""Workflow definitions written by people: errors in their words (paths, snake_case
names, "did you mean"), every problem once and bounded, durations in the CLI's
forms, `depends_on: b`. Through CreateWorkflowDefinition, `--workflows-dir` and
`opscore workflows create`."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from opscore_proto.v1 import dispatch_pb2 as dpb
from opscore_proto.v1 import workflow_pb2 as pb

from opscore import durations, limits
from opscore.errors import ConfigError
from opscore.server import OpsCoreServer
from tests.conftest import expect_error, make_config
from tests.support.cli import REPO_ROOT, opscore

pytestmark = pytest.mark.backends("sqlite", "postgres")

TASK_FIELDS = (
    "id, name, capability, agent_id, parameters, depends_on, retry_policy, timeout, "
    "heartbeat_timeout, priority, fallback"
)


async def create(h: Any, source: str) -> pb.CreateWorkflowDefinitionResponse:
    return await h.workflow.CreateWorkflowDefinition(
        pb.CreateWorkflowDefinitionRequest(source=source)
    )


async def refused(h: Any, source: str | pb.WorkflowDefinition, *contains: str) -> tuple[str, list]:
    """The INVALID_ARGUMENT message and its BadRequest field violations."""
    req = (
        pb.CreateWorkflowDefinitionRequest(source=source)
        if isinstance(source, str)
        else pb.CreateWorkflowDefinitionRequest(definition=source)
    )
    err = await expect_error(
        h.workflow.CreateWorkflowDefinition(req), grpc.StatusCode.INVALID_ARGUMENT, *contains
    )
    status = status_pb2.Status.FromString(dict(err.trailing_metadata())["grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details)
    return err.details() or "", [(v.field, v.description) for v in bad.field_violations]


def no_protobuf_words(message: str) -> None:
    for leak in ("opscore.v1", "Message type", "retryPolicy", "dependsOn", "createTime"):
        assert leak not in message, f"{leak!r} leaked into {message!r}"


# ------------------------------------------------------------------ unknown fields


async def test_unknown_field_is_named_with_its_path_and_a_suggestion(harness):
    source = (
        "id: w\ntasks:\n  - id: a\n    capability: c\n  - id: b\n    capability: c\n"
        "  - id: c\n    capability: c\n    retries: 3\n"
    )
    message, violations = await refused(harness, source, "tasks[2].retries", "did you mean")
    assert "retry_policy" in message and "max_attempts" in message
    no_protobuf_words(message)
    assert violations == [("tasks[2].retries", violations[0][1])]


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("capabilty", "capability"),
        ("dependson", "depends_on"),
        ("heartbeatTimout", "heartbeat_timeout"),
        ("agent-id", "agent_id"),
        ("needs", "depends_on"),
        ("params", "parameters"),
    ],
)
async def test_did_you_mean(harness, key, suggestion):
    source = json.dumps({"id": "w", "tasks": [{"id": "a", "capability": "c", key: "x"}]})
    message, _ = await refused(harness, source, f"tasks[0].{key}", f"did you mean {suggestion}?")
    no_protobuf_words(message)


async def test_unknown_field_without_a_guess_lists_the_input_fields(harness):
    message, _ = await refused(
        harness,
        "id: w\ntasks:\n  - {id: a, capability: c, zzzzqqq: 1}\n",
        "tasks[0].zzzzqqq",
        f"the fields of a task are {TASK_FIELDS}",
    )
    no_protobuf_words(message)
    message, _ = await refused(
        harness,
        "id: w\ncolour: red\ntasks: [{id: a, capability: c}]\n",
        "colour: unknown field 'colour'",
        "id, name, description, version, tasks",
    )
    assert "create_time" not in message  # output-only: never suggested


async def test_a_definition_read_back_can_be_stored_again(harness):
    """create_time is set by the server: a source that carries it (the JSON of
    `workflows get --json`) is accepted and the field ignored."""
    first = await create(harness, "id: rt\ntasks: [{id: a, capability: c, timeout: 5m}]\n")
    text = json_format.MessageToJson(first.definition, preserving_proto_field_name=True)
    assert "create_time" in text
    again = await create(harness, text)
    assert not again.created and again.definition.version == first.definition.version


# ------------------------------------------------------------------ every problem, once


async def test_every_problem_is_reported_once_in_one_error(harness):
    source = """
id: w
tasks:
  - id: fetch
    capabilty: data.fetch
    timeout: 5 minutes
  - id: parse
    capability: text
    depends_on: fecth
  - id: parse
    capability: text
  - capability: text
    priority: high
"""
    message, violations = await refused(harness, source)
    no_protobuf_words(message)
    expected = {
        "tasks[0].capabilty": "did you mean capability?",
        "tasks[0].timeout": "'5 minutes' is not a duration",
        "tasks[1].depends_on[0]": "unknown task 'fecth'; did you mean 'fetch'?",
        "tasks[2].id": "task 'parse' is defined twice (tasks[1], tasks[2])",
        "tasks[3].id": "tasks[3] has no id",
        "tasks[3].priority": "expected a whole number, got the string 'high'",
    }
    assert message.startswith(f"the workflow definition has {len(expected)} problems:")
    assert sorted(f for f, _ in violations) == sorted(expected)
    for field, text in expected.items():
        (description,) = [d for f, d in violations if f == field]
        assert text in description
        assert message.count(description) == 1  # once in the message...
    # ...and a misspelt capability is not also "a task with no capability".
    assert "neither capability nor agent_id" not in message
    assert "accepted forms" not in message  # the duration hint is the forms themselves
    assert durations.FORMS in message


async def test_the_cli_shows_each_problem_once(harness, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("id: w\ntasks:\n  - id: a\n    capabilty: c\n    timeout: soon\n")
    r = await opscore("workflows", "create", "-f", str(path), target=harness.target)
    assert r.code != 0, r
    assert "tasks[0].capabilty" in r.err and "did you mean capability?" in r.err
    assert "tasks[0].timeout" in r.err and "'soon' is not a duration" in r.err
    assert r.err.count("did you mean capability?") == 1, r.err
    assert r.err.count("is not a duration") == 1, r.err
    no_protobuf_words(r.err)
    r = await opscore("workflows", "create", "-f", str(path), "--json", target=harness.target)
    error = json.loads(r.err.strip().splitlines()[-1])["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert {v["field"] for v in error["field_violations"]} == {
        "tasks[0].capabilty",
        "tasks[0].timeout",
    }


async def test_single_field_errors_are_not_printed_twice_by_the_cli(harness):
    r = await opscore("tasks", "get", "bad id!", target=harness.target)
    assert r.code != 0 and "INVALID_ARGUMENT" in r.err
    assert r.err.count("not a valid task id") == 1, r.err


@pytest.mark.parametrize("as_message", [False, True])
async def test_many_problems_are_bounded(harness, as_message):
    """Thousands of problems: the first few, then a count. Unbounded details do
    not fit in gRPC trailers (clients refuse them: RESOURCE_EXHAUSTED)."""
    body = {"id": "w", "tasks": [{"id": f"t{i}", "depends_on": [f"x{i}"]} for i in range(3000)]}
    source: Any = (
        json_format.ParseDict(body, pb.WorkflowDefinition()) if as_message else json.dumps(body)
    )
    message, violations = await refused(harness, source, "the workflow definition has 6000")
    shown = limits.MAX_REPORTED_PROBLEMS
    assert len(violations) == shown
    assert message.endswith(f"and {6000 - shown} more")
    assert len(message) < 8 * 1024


async def test_a_cycle_is_found_alongside_other_problems(harness):
    body = {
        "id": "w",
        "tasks": [
            {"id": "a", "capability": "c", "depends_on": ["c"]},
            {"id": "b", "capability": "c", "depends_on": ["a"], "timeout": "0s"},
            {"id": "c", "capability": "c", "depends_on": ["b"]},
        ],
    }
    for source in (json.dumps(body), json_format.ParseDict(body, pb.WorkflowDefinition())):
        message, violations = await refused(harness, source, "dependency cycle: a -> b -> c -> a")
        assert "tasks[1].timeout" in message and len(violations) == 2


@pytest.mark.parametrize(
    ("tasks", "field", "text"),
    [
        ([{"id": "", "capability": "c"}], "tasks[0].id", "tasks[0] has no id"),
        ([{"capability": "c"}], "tasks[0].id", "tasks[0] has no id"),
        ([{"id": "a b", "capability": "c"}], "tasks[0].id", "task id 'a b' is not valid"),
        (
            [{"id": "a", "capability": "c", "fallback": "zz"}],
            "tasks[0].fallback",
            "unknown fallback 'zz'",
        ),
        (
            [
                {"id": "fetch", "capability": "c"},
                {"id": "b", "capability": "c", "fallback": "fech"},
            ],
            "tasks[1].fallback",
            "did you mean 'fetch'?",
        ),
    ],
)
async def test_ids_and_references(harness, tasks, field, text):
    for source in (
        json.dumps({"id": "w", "tasks": tasks}),
        json_format.ParseDict({"id": "w", "tasks": tasks}, pb.WorkflowDefinition()),
    ):
        _, violations = await refused(harness, source, text)
        assert field in [f for f, _ in violations]


async def test_retry_policy_problems_are_all_reported(harness):
    message, violations = await refused(
        harness,
        "id: w\ntasks:\n  - id: a\n    capability: c\n    retry_policy:\n"
        "      {max_attempts: 500, initial_backoff: -1s, backoff_multiplier: 1000}\n",
    )
    assert {f for f, _ in violations} == {
        "tasks[0].retry_policy.max_attempts",
        "tasks[0].retry_policy.initial_backoff",
        "tasks[0].retry_policy.backoff_multiplier",
    }
    assert "task 'a': retry_policy.max_attempts must be between 1 and 100" in message


# ------------------------------------------------------------------ keys given twice


@pytest.mark.parametrize(
    "source",
    [
        "id: w\ntasks:\n  - id: a\n    capability: c\n    capability: d\n",
        '{"id": "w", "tasks": [{"id": "a", "capability": "c", "capability": "d"}]}',
    ],
)
async def test_a_key_given_twice_is_refused(harness, source):
    """Both parsers would keep the last value silently."""
    await refused(harness, source, "tasks[0].capability", "'capability' is given twice")


async def test_a_field_given_in_both_spellings_is_refused(harness):
    source = json.dumps(
        {
            "id": "w",
            "tasks": [
                {"id": "a", "capability": "c"},
                {"id": "b", "capability": "c", "depends_on": ["a"], "dependsOn": []},
            ],
        }
    )
    await refused(
        harness, source, "tasks[1].depends_on", "given twice, as depends_on and dependsOn"
    )


async def test_yaml_merge_keys_may_override(harness):
    source = (
        "id: merged\nname: m\ntasks:\n  - &base {id: a, capability: c, timeout: 5m}\n"
        "  - <<: *base\n    id: b\n    depends_on: a\n"
    )
    d = (await create(harness, source)).definition
    assert [t.id for t in d.tasks] == ["a", "b"]
    assert d.tasks[1].timeout.seconds == 300 and list(d.tasks[1].depends_on) == ["a"]


# ------------------------------------------------------------------ values


async def test_values_of_the_wrong_kind_say_what_was_expected(harness):
    message, violations = await refused(
        harness,
        "id: 7\ntasks:\n  - id: a\n    capability: c\n    parameters: [1, 2]\n"
        "  - id: b\n    capability: c\n    parameters: {when: 2024-01-01, 3: x}\n",
    )
    no_protobuf_words(message)
    got = dict(violations)
    assert "expected a string, got the number 7 (quote it: '7')" in got["id"]
    assert "expected a mapping, got a list" in got["tasks[0].parameters"]
    assert "a date is not JSON-like" in got["tasks[1].parameters.when"]
    assert "keys must be strings" in got["tasks[1].parameters.3"]
    await refused(
        harness, "id: w\ntasks: {a: {capability: c}}\n", "tasks: expected a list of tasks"
    )
    await refused(harness, "id: w\ntasks: [fetch]\n", "tasks[0]: expected a task")


# ------------------------------------------------------------------ durations

DURATIONS = [
    ("5m", timedelta(minutes=5)),
    ("1500ms", timedelta(milliseconds=1500)),
    ("2h", timedelta(hours=2)),
    ("30s", timedelta(seconds=30)),
    ("1.5s", timedelta(seconds=1.5)),
    ("3s", timedelta(seconds=3)),  # the protobuf JSON form
    ("0.250s", timedelta(milliseconds=250)),
    (45, timedelta(seconds=45)),
    (0.5, timedelta(milliseconds=500)),
    (" 10 M ", timedelta(minutes=10)),
]


@pytest.mark.parametrize(("text", "expected"), DURATIONS)
async def test_durations_in_the_cli_forms(harness, text, expected):
    task = {
        "id": "a",
        "capability": "c",
        "timeout": text,
        "heartbeat_timeout": text,
        "retry_policy": {"initial_backoff": text, "max_backoff": text},
    }
    for source in (
        json.dumps({"id": "from-json", "tasks": [task]}),
        yaml.safe_dump({"id": "from-yaml", "tasks": [task]}),
    ):
        d = (await create(harness, source)).definition
        t = d.tasks[0]
        assert t.timeout.ToTimedelta() == expected, source
        assert t.heartbeat_timeout.ToTimedelta() == expected
        assert t.retry_policy.initial_backoff.ToTimedelta() == expected
        assert t.retry_policy.max_backoff.ToTimedelta() == expected


@pytest.mark.parametrize(
    ("field", "text", "message"),
    [
        ("timeout", "721h", "timeout must be at most 30 days"),
        ("timeout", "0s", "timeout must be positive"),
        ("timeout", "-1s", "timeout must be positive"),
        ("heartbeat_timeout", "soon", "'soon' is not a duration"),
        ("timeout", "5 minutes", durations.FORMS),
        ("timeout", "1h30m", "is not a duration"),
        ("timeout", "nan", "is not a duration"),
        ("timeout", True, "is not a duration"),
        ("timeout", "1e20s", "out of range"),
    ],
)
async def test_bad_durations_name_the_field_and_the_forms(harness, field, text, message):
    source = json.dumps({"id": "w", "tasks": [{"id": "a", "capability": "c", field: text}]})
    _, violations = await refused(harness, source, f"tasks[0].{field}", message)
    assert [f for f, _ in violations] == [f"tasks[0].{field}"]


async def test_backoff_bounds_are_unchanged(harness):
    await refused(
        harness,
        "id: w\ntasks: [{id: a, capability: c, retry_policy: {initial_backoff: 25h}}]\n",
        "tasks[0].retry_policy.initial_backoff",
        "must be at most",
    )


async def test_the_cli_takes_the_same_forms(harness):
    for text, expected in (("1500ms", timedelta(milliseconds=1500)), ("5m", timedelta(minutes=5))):
        r = await opscore(
            "tasks", "enqueue", "c", "--timeout", text, "--json", target=harness.target
        )
        assert r.code == 0, r
        task = await harness.dispatch.GetTask(dpb.GetTaskRequest(task_id=r.json()["task_id"]))
        assert task.task.timeout.ToTimedelta() == expected
    r = await opscore("tasks", "enqueue", "c", "--timeout", "5 minutes", target=harness.target)
    assert r.code == 2 and durations.FORMS in r.err


def test_the_shared_parser_needs_no_server_package():
    """The client package imports it: stdlib and opscore.limits only."""
    code = (
        "import sys, opscore.durations as d; "
        "assert d.parse_duration('1500ms').total_seconds() == 1.5; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('google', 'grpc', 'yaml', 'aiosqlite', 'asyncpg', 'opscore_proto')]; "
        "print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


# ------------------------------------------------------------------ depends_on


async def test_depends_on_a_single_id(harness):
    d = (
        await create(
            harness,
            "id: w\ntasks:\n  - {id: a, capability: c}\n"
            "  - {id: b, capability: c, depends_on: a}\n",
        )
    ).definition
    assert list(d.tasks[1].depends_on) == ["a"]


@pytest.mark.parametrize("value", ["3", "{a: 1}", "true"])
async def test_depends_on_of_another_kind_asks_for_a_list(harness, value):
    message, _ = await refused(
        harness,
        f"id: w\ntasks:\n  - {{id: a, capability: c}}\n  - {{id: b, capability: c, "
        f"depends_on: {value}}}\n",
        "tasks[1].depends_on",
        "expected a list of task ids",
    )
    no_protobuf_words(message)
    await refused(
        harness,
        "id: w\ntasks: [{id: a, capability: c}, {id: b, capability: c, depends_on: [a, 3]}]\n",
        "tasks[1].depends_on[1]",
        "expected a string, got the number 3",
    )


# ------------------------------------------------------------------ --workflows-dir


async def test_workflows_dir_reports_every_problem_of_a_file(tmp_path, db_url):
    bad = tmp_path / "defs"
    bad.mkdir()
    (bad / "broken.yaml").write_text(
        "id: x\ntasks:\n  - id: a\n    capability: c\n    retries: 2\n    timeout: 1500ms\n"
        "  - id: b\n    capability: c\n    depends_on: zz\n"
    )
    server = OpsCoreServer(make_config(tmp_path, db=db_url, workflows_dir=str(bad)))
    with pytest.raises(ConfigError) as info:
        await server.start()
    text = str(info.value)
    assert "broken.yaml" in text and "2 problems" in text
    assert "tasks[0].retries" in text and "did you mean retry_policy" in text
    assert "tasks[1].depends_on[0]" in text and "unknown task 'zz'" in text
    no_protobuf_words(text)
