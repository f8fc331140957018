"""Configuration precedence and the errors a bad config gets (file, line, reason)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spoe_agent.config import ConfigError, load_config, parse_bind, parse_duration, parse_size

REPO = Path(__file__).resolve().parents[1]


def run_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``spoe-agent ARGS --workers 1 --check`` in a subprocess, with no OTEL_* variable of the
    test run's own environment unless ``env`` gives it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-m", "spoe_agent", *args, "--workers", "1", "--check"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**clean, **(env or {})})


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.ini"
    path.write_text(text)
    return str(path)


def test_defaults_listen_on_loopback() -> None:
    config = load_config(env={})
    assert config.bind == "127.0.0.1:12345"
    assert config.exporter == "jaeger" and config.jaeger_agent_port == 6831
    assert config.propagators == ("tracecontext", "baggage")


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[listener]\nbind = 127.0.0.1:7000\n[tracing]\nservice_name = file\n"
                           "jaeger_agent_port = 7777\nsession_ttl = 10s\n")
    env = {"OTEL_SERVICE_NAME": "env", "OTEL_EXPORTER_JAEGER_AGENT_PORT": "6832"}
    config = load_config(path, {"service_name": "flag"}, env=env)
    assert config.bind == "127.0.0.1:7000"
    assert config.service_name == "flag"
    assert config.jaeger_agent_port == 6832
    assert config.session_ttl == 10.0
    assert config.sources["service_name"] == "command line"
    assert config.sources["jaeger_agent_port"] == "environment variable OTEL_EXPORTER_JAEGER_AGENT_PORT"
    assert config.sources["bind"].endswith("agent.ini:2")


def test_otel_variables_are_read() -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_PROPAGATORS": "tracecontext,baggage,b3multi,jaeger",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
    }
    config = load_config(env=env)
    assert config.exporter == "console"
    assert config.propagators == ("tracecontext", "baggage", "b3multi", "jaeger")
    assert config.sampler == "parentbased_traceidratio" and config.sampler_arg == "0.25"
    assert config.export_delay == pytest.approx(0.2)
    assert config.export_queue_size == 100
    assert config.otlp_endpoint == "http://collector:4318/v1/traces"


def test_otel_sdk_disabled_turns_export_off_and_a_flag_turns_it_back_on() -> None:
    jaeger = {"OTEL_TRACES_EXPORTER": "jaeger"}
    for value in ("true", " TRUE "):
        config = load_config(env={**jaeger, "OTEL_SDK_DISABLED": value})
        assert config.exporter == "none"
        assert config.sources["exporter"] == "environment variable OTEL_SDK_DISABLED"
    for value in ("false", "", "  "):
        assert load_config(env={**jaeger, "OTEL_SDK_DISABLED": value}).exporter == "jaeger"
    flag = load_config(overrides={"exporter": "jaeger"}, env={"OTEL_SDK_DISABLED": "true"})
    assert flag.exporter == "jaeger"  # command-line flags over the environment, as always
    with pytest.raises(ConfigError, match="OTEL_SDK_DISABLED: expected true or false, got '1'"):
        load_config(env={"OTEL_SDK_DISABLED": "1"})


def test_a_span_attribute_count_limit_the_sdk_would_refuse_is_refused_as_configuration(
    tmp_path: Path,
) -> None:
    """The SDK reads OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT when imported and raised on a typo: the
    agent stopped with "cannot start" and the SDK's words, not as a configuration error."""
    for value in ("abc", "-1", "1.5"):
        with pytest.raises(ConfigError, match="OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT: expected a "
                           f"non-negative integer, got '{value}'"):
            load_config(env={"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": value})
    for value in ("", " ", "0", "64"):
        load_config(env={"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": value})
    done = run_check(env={"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "abc"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("spoe-agent: configuration error: environment variable "
                                  "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT"), done.stderr


def test_check_says_why_the_exporter_is_none_and_refuses_a_value_that_is_not_a_boolean(
    tmp_path: Path,
) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text("[tracing]\nexporter = jaeger\n")

    def check(value: str) -> subprocess.CompletedProcess[str]:
        return run_check("-c", str(ini), env={"OTEL_SDK_DISABLED": value})

    disabled = check("true")
    assert disabled.returncode == 0, disabled.stderr
    assert "exporter none (OTEL_SDK_DISABLED=true)" in disabled.stdout
    enabled = check("false")
    assert enabled.returncode == 0, enabled
    assert "exporter jaeger to agent localhost:6831 (UDP))" in enabled.stdout, enabled
    refused = check("yes")
    assert refused.returncode == 2
    assert "OTEL_SDK_DISABLED: expected true or false, got 'yes'" in refused.stderr


def test_check_names_where_spans_go_and_warns_of_a_collector_url_without_a_path() -> None:
    """Used as written (a proxy may serve another path), such a URL passed --check and then
    had every batch answered 404; the summary shows the endpoint, never its password."""
    done = run_check(env={"OTEL_EXPORTER_JAEGER_ENDPOINT": "http://bob:s3cret@127.0.0.1:51268/"})
    assert done.returncode == 0, done.stderr
    assert "; exporter jaeger to collector http://127.0.0.1:51268/)" in done.stdout
    assert ("spoe-agent: warning: jaeger_endpoint http://127.0.0.1:51268/ (environment variable "
            "OTEL_EXPORTER_JAEGER_ENDPOINT) has no path: Jaeger's collector takes spans at "
            "/api/traces (http://127.0.0.1:51268/api/traces)") in done.stderr
    assert "s3cret" not in done.stdout + done.stderr


def test_check_warns_of_a_frame_size_that_will_cost_spans(tmp_path: Path) -> None:
    """Black-box run: max_frame_size = 512 passed --check in silence; the warning came only
    at HAProxy's first HELLO, once messages were already being dropped."""
    ini = tmp_path / "agent.ini"
    ini.write_text("[listener]\nmax_frame_size = 512\n")
    done = run_check("-c", str(ini))
    assert done.returncode == 0, done.stderr
    assert (f"spoe-agent: warning: max_frame_size 512 ({ini}:2) is below 2048: HAProxy drops "
            "every SPOE message larger than the negotiated frame") in done.stderr
    assert "leave it at its default (65532)" in done.stderr
    ini.write_text("[listener]\nmax_frame_size = 2048\n")
    quiet = run_check("-c", str(ini))
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr


def test_specific_otel_variables_win_over_the_general_ones() -> None:
    general = {"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "100",
               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    config = load_config(env=general)
    assert config.max_attribute_length == 100
    assert config.sources["max_attribute_length"] == (
        "environment variable OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT")
    config = load_config(env={**general, "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "50"})
    assert config.max_attribute_length == 50
    with pytest.raises(ConfigError, match="OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT: must be"):
        load_config(env={"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "0"})


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_PROTOCOL",
                                      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"])
@pytest.mark.parametrize("protocol", ["grpc", "http/json"])
def test_an_otlp_protocol_other_than_http_protobuf_is_refused(variable: str, protocol: str) -> None:
    """Refused at start-up, naming the variable: an HTTP exporter aimed at a gRPC port would
    otherwise fail every export with nothing to say why."""
    env = {"OTEL_TRACES_EXPORTER": "otlp", variable: protocol}
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    message = str(info.value)
    assert message.startswith(f"environment variable {variable}: OTLP over {protocol} "
                              "is not supported"), message
    # The variable is OTLP's alone: with another exporter it changes nothing.
    assert load_config(env={**env, "OTEL_TRACES_EXPORTER": "jaeger"}).exporter == "jaeger"
    assert load_config(env={**env, variable: "HTTP/protobuf"}).otlp_protocol == "http/protobuf"


@pytest.mark.parametrize(
    ("env", "variable", "reason"),
    [
        ({"OTEL_BSP_SCHEDULE_DELAY": "0"}, "OTEL_BSP_SCHEDULE_DELAY", "must be more than 0"),
        ({"OTEL_BSP_EXPORT_TIMEOUT": "0"}, "OTEL_BSP_EXPORT_TIMEOUT", "must be more than 0"),
        ({"OTEL_EXPORTER_JAEGER_ENDPOINT": "foo"}, "OTEL_EXPORTER_JAEGER_ENDPOINT",
         "expected an http:// or https:// URL, got 'foo'"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "otlp"},
         "OTEL_EXPORTER_OTLP_ENDPOINT",
         "expected an http:// or https:// URL, got '127.0.0.1:4318'"),
        ({"OTEL_PROPAGATORS": "none,b3"}, "OTEL_PROPAGATORS", "cannot be combined"),
        ({"OTEL_EXPORTER_JAEGER_AGENT_HOST": "jaeger!"}, "OTEL_EXPORTER_JAEGER_AGENT_HOST",
         "expected a host name or an IP address, got 'jaeger!'"),
    ],
)
def test_values_refused_where_they_are_read(env: dict[str, str], variable: str,
                                            reason: str) -> None:
    """Refused with the variable named, not later by whatever component they reach."""
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert variable in info.value.where and reason in info.value.reason, str(info.value)


def test_a_bad_loky_cpu_bound_is_named_and_only_matters_for_auto(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "abc")  # loky reads it from the process
    with pytest.raises(ConfigError, match=r"workers \(auto, the default\): LOKY_MAX_CPU_COUNT"):
        load_config(env={})
    assert load_config(overrides={"workers": 1}, env={}).workers == 1


def test_bsp_milliseconds_may_have_a_fraction_and_a_unit() -> None:
    assert load_config(env={"OTEL_BSP_SCHEDULE_DELAY": "1.5"}).export_delay == 0.0015
    assert load_config(env={"OTEL_BSP_SCHEDULE_DELAY": "250"}).export_delay == 0.25
    assert load_config(env={"OTEL_BSP_EXPORT_TIMEOUT": "2s"}).export_timeout == 2.0


def test_the_file_counts_export_durations_in_seconds_and_a_unit_says_otherwise(
        tmp_path: Path) -> None:
    for text, delay in (("60", 60.0), ("500ms", 0.5), ("500s", 500.0), ("2.5", 2.5)):
        path = write(tmp_path, f"[tracing]\nexport_delay = {text}\nexport_timeout = 600\n")
        config = load_config(str(path), env={})
        assert (config.export_delay, config.export_timeout) == (delay, 600.0)


def test_jaeger_timeout_counts_seconds_as_the_official_exporter_reads_it(tmp_path: Path) -> None:
    assert load_config(env={}).jaeger_timeout == 10.0
    assert load_config(env={"OTEL_EXPORTER_JAEGER_TIMEOUT": "5"}).jaeger_timeout == 5.0
    assert load_config(env={"OTEL_EXPORTER_JAEGER_TIMEOUT": "1500ms"}).jaeger_timeout == 1.5
    path = write(tmp_path, "[tracing]\njaeger_timeout = 2s\n")
    assert load_config(path, env={}).jaeger_timeout == 2.0
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_JAEGER_TIMEOUT.*more than 0"):
        load_config(env={"OTEL_EXPORTER_JAEGER_TIMEOUT": "0"})
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_JAEGER_TIMEOUT"):
        load_config(env={"OTEL_EXPORTER_JAEGER_TIMEOUT": "ten"})


def test_the_jaeger_protocol_variable_chooses_agent_or_collector_or_is_refused(
        tmp_path: Path) -> None:
    """OTEL_EXPORTER_JAEGER_PROTOCOL was ignored, even set to grpc: spans went over UDP to an
    agent a user who asked for a collector does not run. Unset, the endpoint still decides."""
    assert load_config(env={}).exporter_text() == "jaeger to agent localhost:6831 (UDP)"
    collector = load_config(env={"OTEL_EXPORTER_JAEGER_PROTOCOL": "http/thrift.binary"})
    assert collector.jaeger_endpoint == "http://localhost:14268/api/traces"
    assert collector.sources["jaeger_endpoint"].startswith(
        "environment variable OTEL_EXPORTER_JAEGER_PROTOCOL")
    given = {"OTEL_EXPORTER_JAEGER_PROTOCOL": "http/thrift.binary",
             "OTEL_EXPORTER_JAEGER_ENDPOINT": "http://jaeger:14268/api/traces"}
    assert load_config(env=given).jaeger_endpoint == "http://jaeger:14268/api/traces"
    agent = load_config(env={"OTEL_EXPORTER_JAEGER_PROTOCOL": "udp/thrift.compact"})
    assert agent.jaeger_endpoint == ""
    path = write(tmp_path, "[tracing]\njaeger_protocol = http/thrift.binary\n")
    assert load_config(path, env={}).jaeger_endpoint == "http://localhost:14268/api/traces"
    for env, reason in [
        ({"OTEL_EXPORTER_JAEGER_PROTOCOL": "grpc"}, "grpc is not supported: use udp/thrift.compact"),
        ({"OTEL_EXPORTER_JAEGER_PROTOCOL": "udp/thrift.binary"}, "udp/thrift.binary is not supp"),
        ({"OTEL_EXPORTER_JAEGER_PROTOCOL": "thrift"}, "expected one of udp/thrift.compact, "),
        ({"OTEL_EXPORTER_JAEGER_PROTOCOL": "udp/thrift.compact",
          "OTEL_EXPORTER_JAEGER_ENDPOINT": "http://jaeger:14268/api/traces"},
         "udp/thrift.compact sends to a Jaeger agent, but jaeger_endpoint \\(environment "
         "variable OTEL_EXPORTER_JAEGER_ENDPOINT\\) names a collector"),
    ]:
        with pytest.raises(ConfigError, match="environment variable OTEL_EXPORTER_JAEGER_PROTOCOL: "
                           + reason):
            load_config(env=env)
        # Left alone while another exporter runs: the environment may be shared.
        assert load_config(env={**env, "OTEL_TRACES_EXPORTER": "otlp"}).exporter == "otlp"


def test_otlp_exporter_variables_are_checked_where_the_sdk_would_drop_or_misread_them(
    tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    config = load_config(env={"OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca),
                              "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2500ms",
                              "OTEL_EXPORTER_OTLP_COMPRESSION": "GZIP",
                              "OTEL_EXPORTER_OTLP_HEADERS": "a=1, b=2"})
    assert (config.otlp_certificate, config.otlp_timeout) == (str(ca), 2.5)
    assert (config.otlp_compression, config.otlp_headers) == ("gzip", "a=1, b=2")
    assert config.sources["otlp_timeout"] == "environment variable OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
    for env, reason in [
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "2000"}, "2000 seconds\\? .*give a unit, such as 2000ms"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "0"}, "must be more than 0"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "-1"}, "expected a duration"),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "expected one of none, gzip, deflate"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "api-key"}, "expected name=value pairs.*'api-key'"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": 'api-key="s3cret"'},
         "the value of 'api-key' is not a valid header value"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "a=b%0D%0AX-Evil:1"}, ".*not a valid header value"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "a=%E2%82%AC"}, ".*not a valid header value"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "api-key=50%off"},
         "the value of 'api-key': a '%' not followed by two hex digits"),
        ({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent.pem"}, "no such file"),
        ({"OTEL_EXPORTER_OTLP_CLIENT_KEY": str(ca)}, "an OTLP client key needs its client certificate"),
        ({"OTEL_EXPORTER_JAEGER_TIMEOUT": "5000"}, "5000 seconds"),
        ({"OTEL_EXPORTER_JAEGER_CERTIFICATE": str(tmp_path)}, "no such file"),
    ]:
        name = next(iter(env))
        exporter = "otlp" if "OTLP" in name else "jaeger"
        with pytest.raises(ConfigError, match=f"variable {name}: {reason}") as info:
            load_config(env={**env, "OTEL_TRACES_EXPORTER": exporter})
        assert "s3cret" not in str(info.value)
    # files that exist but do not load are refused when the exporter would use them
    for env in ({"OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca)},
                {"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(ca)}):
        name = next(iter(env))
        with pytest.raises(ConfigError, match=f"variable {name}: otlp_.*cannot load"):
            load_config(env={**env, "OTEL_TRACES_EXPORTER": "otlp"})
        load_config(env=env)  # the Jaeger exporter does not read them
    # A certificate without its key says so (it read "[SSL] PEM lib" alone: black-box run).
    with pytest.raises(ConfigError, match=r"\(no otlp_client_key is set, "
                                          "OTEL_EXPORTER_OTLP_CLIENT_KEY: this file must then "
                                          r"hold the key too\)"):
        load_config(env={"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(ca),
                         "OTEL_TRACES_EXPORTER": "otlp"})
    # agent.ini's protocol errors name their key, as its other errors do.
    for text, key in (("exporter = otlp\notlp_protocol = grpc\n", "otlp_protocol"),
                      ("jaeger_protocol = grpc\n", "jaeger_protocol")):
        path = write(tmp_path, "[tracing]\n" + text)
        with pytest.raises(ConfigError, match=rf"agent.ini:\d: \[tracing\] {key}: "):
            load_config(path, env={})
    path = write(tmp_path, "[tracing]\notlp_timeout = 2000\n")
    with pytest.raises(ConfigError, match="agent.ini:2: .*2000 seconds"):
        load_config(path, env={})


def test_another_exporters_bad_variables_are_left_alone(tmp_path: Path) -> None:
    """The environment is often shared: OTEL_EXPORTER_OTLP_TIMEOUT=10000 (milliseconds, for
    the other SDKs) stopped an agent exporting to Jaeger, which never reads it. The chosen
    exporter's variables are still refused, whichever way it was chosen; agent.ini's keys are
    the agent's own and are refused whatever the exporter."""
    otlp = {"OTEL_EXPORTER_OTLP_TIMEOUT": "10000", "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317",
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key", "OTEL_EXPORTER_OTLP_CLIENT_KEY": "/none.pem"}
    jaeger = {"OTEL_EXPORTER_JAEGER_ENDPOINT": "collector:14268",
              "OTEL_EXPORTER_JAEGER_AGENT_PORT": "six"}
    config = load_config(env=otlp)
    assert (config.exporter, config.otlp_timeout, config.otlp_endpoint) == ("jaeger", 10.0, "")
    assert not {"otlp_timeout", "otlp_endpoint"} & set(config.sources)
    for exporter in ("console", "none"):
        load_config(env={**otlp, **jaeger, "OTEL_TRACES_EXPORTER": exporter})
    assert load_config(env={**jaeger, "OTEL_TRACES_EXPORTER": "otlp"}).jaeger_agent_port == 6831
    with pytest.raises(ConfigError, match="variable OTEL_EXPORTER_OTLP_"):
        load_config(env=otlp, overrides={"exporter": "otlp"})
    with pytest.raises(ConfigError, match="variable OTEL_EXPORTER_JAEGER_AGENT_PORT"):
        load_config(env={**jaeger, "OTEL_TRACES_EXPORTER": "otlp"}, overrides={"exporter": "jaeger"})
    for name, value in otlp.items():
        with pytest.raises(ConfigError, match=f"variable {name}: "):
            load_config(env={name: value, "OTEL_TRACES_EXPORTER": "otlp"})
    path = write(tmp_path, "[tracing]\nexporter = jaeger\notlp_timeout = 2000\n")
    with pytest.raises(ConfigError, match="agent.ini:3: .*2000 seconds"):
        load_config(path, env={})


def test_the_readmes_agent_ini_loads_as_shown(tmp_path: Path) -> None:
    """The reference agent.ini in README.md is what operators copy: every key in it must be
    one the agent knows, with a value it takes."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```ini\n[listener]\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "agent.ini"
    path.write_text("[listener]\n" + block)
    config = load_config(str(path), env={})
    assert {"bind", "exporter", "otlp_timeout", "export_timeout"} <= set(config.sources)
    assert (config.otlp_certificate, config.jaeger_timeout) == ("", 10.0)


@pytest.mark.parametrize("name, url", [
    ("OTEL_EXPORTER_JAEGER_ENDPOINT", "http://collector:99999/api/traces"),
    ("OTEL_EXPORTER_JAEGER_ENDPOINT", "http://collector:abc/api/traces"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:99999"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://collector:0/v1/traces"),
])
def test_an_endpoint_port_that_cannot_be_is_refused_naming_the_variable(name: str,
                                                                        url: str) -> None:
    """Black-box run: the Jaeger endpoint's bad port stopped the agent with "Port out of range
    0-65535" and no variable named; the OTLP one passed --check, and every export failed."""
    with pytest.raises(ConfigError, match=f"variable {name}: .*is not a number from 1 to 65535"):
        load_config(env={name: url, "OTEL_TRACES_EXPORTER": "otlp" if "OTLP" in name
                         else "jaeger"})


@pytest.mark.parametrize("name, url", [
    ("OTEL_EXPORTER_JAEGER_ENDPOINT", "http://127.0.0.1 x:30732/api/traces"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://exa_mple..com:4318"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://collector!/v1/traces"),
])
def test_an_endpoint_host_that_cannot_be_is_refused_naming_the_variable(name: str,
                                                                        url: str) -> None:
    """Black-box run: they passed --check and the start, then every export failed."""
    with pytest.raises(ConfigError, match=f"variable {name}: the host of .* is not a host name "
                                          "or an IP address"):
        load_config(env={name: url, "OTEL_TRACES_EXPORTER": "otlp" if "OTLP" in name
                         else "jaeger"})
    assert load_config(env={name: url.replace("127.0.0.1 x", "[::1]").replace(
        "exa_mple..com", "exa_mple.com").replace("collector!", "collector"),
        "OTEL_TRACES_EXPORTER": "otlp" if "OTLP" in name else "jaeger"})


def test_credentials_are_not_echoed_and_not_half_set() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"OTEL_EXPORTER_JAEGER_ENDPOINT": "ftp://u:s3cret@c/x"})
    assert "s3cret" not in str(info.value) and "ftp://u:***@c/x" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(env={"OTEL_EXPORTER_JAEGER_ENDPOINT": "ftp://ghp_T0KEN@c/x"})
    assert "T0KEN" not in str(info.value) and "ftp://***@c/x" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(env={"OTEL_EXPORTER_JAEGER_ENDPOINT": "ftp://c/x?access_token=T0KEN&f=1"})
    assert "T0KEN" not in str(info.value) and "ftp://c/x?access_token=REDACTED&f=1" in str(
        info.value)
    for env in ({"OTEL_EXPORTER_JAEGER_USER": "alice"}, {"OTEL_EXPORTER_JAEGER_PASSWORD": "pw"}):
        with pytest.raises(ConfigError, match="jaeger_user and jaeger_password must be set together"):
            load_config(env=env)
        load_config(env={**env, "OTEL_TRACES_EXPORTER": "otlp"})  # unused: not in the way


def test_the_generic_otlp_endpoint_keeps_its_query_after_the_traces_path() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/?tenant=a"}
    assert load_config(env=env).otlp_endpoint == "http://c:4318/v1/traces?tenant=a"


def test_generic_otlp_endpoint_beats_agent_ini_and_loses_to_the_traces_one(tmp_path: Path) -> None:
    path = write(tmp_path, "[tracing]\notlp_endpoint = http://ini:4318/v1/traces\n")
    generic = {"OTEL_EXPORTER_OTLP_ENDPOINT": " http://env:4318/ "}
    assert load_config(path, env=generic).otlp_endpoint == "http://env:4318/v1/traces"
    both = {**generic, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4318/x"}
    assert load_config(path, env=both).otlp_endpoint == "http://traces:4318/x"
    assert load_config(path, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}).otlp_endpoint == (
        "http://ini:4318/v1/traces")


@pytest.mark.parametrize(
    ("value", "endpoint"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("https://collector:4318/", "https://collector:4318/v1/traces"),
        ("http://collector:4318/v1/traces", "http://collector:4318/v1/traces"),
        ("http://gateway/otlp/traces", "http://gateway/otlp/traces"),
        ("", ""),
    ],
)
def test_ini_otlp_endpoint_without_a_path_is_a_base_url(
        tmp_path: Path, value: str, endpoint: str) -> None:
    """Without a path, as OTEL_EXPORTER_OTLP_ENDPOINT; with one, as the traces variable."""
    path = write(tmp_path, f"[tracing]\notlp_endpoint = {value}\n")
    assert load_config(path, env={}).otlp_endpoint == endpoint
    # The traces-specific variable is the full URL, path or not, as in every SDK.
    traces = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4318"}
    assert load_config(path, env=traces).otlp_endpoint == "http://traces:4318"


def test_only_a_queue_size_shrinks_the_default_batch_to_fit() -> None:
    config = load_config(env={"OTEL_BSP_MAX_QUEUE_SIZE": "100"})
    assert (config.export_queue_size, config.export_batch_size) == (100, 100)


def test_sampler_arg_is_ignored_by_samplers_without_a_ratio() -> None:
    from spoe_agent.tracing.pipeline import build_sampler

    config = load_config(env={"OTEL_TRACES_SAMPLER_ARG": "abc"})
    assert build_sampler(config.sampler, config.sampler_arg) is not None
    with pytest.raises(ConfigError, match="OTEL_TRACES_SAMPLER_ARG: expected a ratio between 0 "
                       "and 1 for the traceidratio sampler, got 'abc'"):
        load_config(env={"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "abc"})


def test_an_ini_sampler_arg_is_refused_with_its_section_and_key(tmp_path: Path) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text("[tracing]\nsampler = traceidratio\nsampler_arg = 2\n")
    with pytest.raises(ConfigError) as refused:
        load_config(str(ini), env={})
    assert str(refused.value) == (f"{ini}:3: [tracing] sampler_arg: expected a ratio between 0 "
                                  "and 1 for the traceidratio sampler, got '2'")


@pytest.mark.parametrize("key, value", [
    ("max_frame_size", "16_384"), ("max_frame_size", "\u0661\u0666\u0663\u0668\u0664"),
    ("max_connections", "1e3"),
])
def test_integers_are_written_with_ascii_digits_only(tmp_path: Path, key: str,
                                                     value: str) -> None:
    """int() took "16_384" and other scripts' digits: a value that no other tool reads so."""
    ini = tmp_path / "agent.ini"
    ini.write_text(f"[listener]\n{key} = {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{key}: expected an integer, got"):
        load_config(str(ini), env={})


@pytest.mark.parametrize("bind", ["unix:relative.sock", "unix:./x.sock", "unix:~/x.sock"])
def test_a_unix_socket_path_must_be_absolute(tmp_path: Path, bind: str) -> None:
    """Relative to the working directory, which is / under systemd."""
    ini = tmp_path / "agent.ini"
    ini.write_text(f"[listener]\nbind = {bind}\n")
    with pytest.raises(ConfigError, match="agent.ini:2: .*unix: needs an absolute path"):
        load_config(str(ini), env={})
    assert parse_bind("unix:/run/spoe-agent.sock") == "unix:/run/spoe-agent.sock"


@pytest.mark.parametrize(
    ("metrics", "workers", "reason"),
    [
        ("127.0.0.1:65535", 2, "metrics use ports 65535-65537: past 65535"),
        ("127.0.0.1:7000", 2, "metrics (ports 7000-7002) would take the SPOP listener's port 7001"),
        ("0.0.0.0:7001", 1, "metrics (port 7001) would take the SPOP listener's port 7001"),
        ("[::]:7001", 1, "metrics (port 7001) would take the SPOP listener's port 7001"),
    ],
)
def test_metrics_ports_must_exist_and_leave_the_spop_port_alone(
        metrics: str, workers: int, reason: str) -> None:
    overrides = {"metrics": metrics, "workers": workers, "bind": "127.0.0.1:7001"}
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides, env={})
    assert info.value.where == "command line" and reason in info.value.reason, str(info.value)
    assert load_config(overrides={**overrides, "metrics": "127.0.0.1:9464"}, env={}).metrics


@pytest.mark.parametrize(
    ("raw", "line", "reason"),
    [
        (b"[listener]\nworkers\n", 2, "syntax error: expected 'key = value', got 'workers'"),
        (b"[tracing\nexporter = none\n", 1, "syntax error: unclosed section header '[tracing'"),
        (b"[listener]\nworkers = 1\n\n[tracing\n", 4,
         "syntax error: unclosed section header '[tracing'"),
        (b"[listener]\n= 5\n", 2, "syntax error: expected 'key = value', got '= 5'"),
        (b"[listener]\nbind = 127.0.0.1:21020\n  127.0.0.1:21021\n", 3,
         "syntax error: continuation lines are not supported (this indented line would "
         "continue 'bind')"),
        (b"[listener]\nbind = 127.0.0.1:1\n\n  # why\n  workers = 2\n", 5,
         "continuation lines are not supported"),
        (b"[listener]\nworkers = 1\nworkers = 2\n", 3,
         "syntax error: 'workers' is set twice in [listener]"),
        (b"[listener]\n[listener]\n", 2, "syntax error: section [listener] appears twice"),
        (b"[listener]\n  bind = nowhere\n", 2, "expected HOST:PORT"),
        (b"[DEFAULT]\nworkres = 1\n", 1, "unknown section [DEFAULT]"),
        (b"[tracing]\n\nservice_name = caf\xe9\n", 3, "not UTF-8 text"),
        # configparser took these headers and dropped the rest of the line, setting nothing
        (b"[listener]\nworkers = 1\n[tracing] exporter = bogus\n", 3,
         "expected a section header alone on its line, such as [tracing], got "
         "'[tracing] exporter = bogus'"),
        (b"[tracing]]\n", 1, "expected a section header alone on its line"),
        (b"[tracing ; where spans go]\n", 1, "expected a section header alone on its line"),
        (b"[tracing];sampler = always_off\n", 1, "expected a section header alone on its line"),
        # line ends as configparser counts them: not at a form feed or U+2028 in a comment
        (b"[tracing]\n# a\x0cb\nexporter = bogus\n", 3, "exporter: expected one of"),
        (b"[tracing]\n# a\xe2\x80\xa8b\nexporter = bogus\n", 3, "exporter: expected one of"),
        # an old Mac file: bare CRs end its lines (it was read as one line, and ignored)
        (b"[tracing]\rservice_name = cr\rexporter = bogus\r", 3, "exporter: expected one of"),
        (b"[tracing]\nservice_name = x\x00y\n", 2, "control characters are not allowed"),
    ],
)
def test_more_bad_files_name_their_line(tmp_path: Path, raw: bytes, line: int,
                                        reason: str) -> None:
    path = tmp_path / "agent.ini"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert str(info.value).startswith(f"{path}:{line}: "), str(info.value)
    assert reason in str(info.value)


def test_a_byte_order_mark_is_not_a_setting(tmp_path: Path) -> None:
    path = tmp_path / "agent.ini"
    path.write_bytes(b"\xef\xbb\xbf[listener]\nworkers = 1\n")
    assert load_config(str(path), env={}).workers == 1


def test_ipv6_needs_brackets() -> None:
    with pytest.raises(ValueError, match="in brackets"):
        parse_bind("::1")
    assert parse_bind("[::1]:7000") == "::1:7000"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("[listener]\nbind = nowhere\n", 2, "expected HOST:PORT"),
        ("[listener]\n\n# comment\nmax_frame_size = 100\n", 4, "must be between 256"),
        ("[tracing]\nexporter = zipkin\n", 2, "expected one of jaeger, otlp, console, none"),
        ("[tracing]\nsession_ttl = soon\n", 2, "expected a duration"),
        ("[tracing]\nexporter = otlp\n\notlp_protocol = grpc\n", 4, "OTLP over grpc"),
        ("[listner]\nbind = 127.0.0.1:1\n", 1, "unknown section [listner]"),
        ("# x\n[ listener ]\nbind = 127.0.0.1:1\n", 2, "has spaces inside its brackets"),
        ("\n[bogus ]\n", 2, "unknown section [bogus ]"),
        ("[listener]\n\ntls_key = /k.pem\n", 3, "tls_cert and tls_key must be set together"),
        ("[listener]\ntls_cert = /c.pem\n", 2, "tls_cert and tls_key must be set together"),
        ("[listener]\nbnid = 127.0.0.1:1\n", 2, "unknown option 'bnid' in [listener]"),
        ("[tracing]\npropagators = tracecontext,w3c\n", 2, "unknown propagator 'w3c'"),
        ("bind = 1\n", 1, "syntax error: 'bind = 1' comes before any [section] header"),
    ],
)
def test_bad_config_names_file_line_and_reason(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert reason in message


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_JAEGER_AGENT_PORT"):
        load_config(env={"OTEL_EXPORTER_JAEGER_AGENT_PORT": "x"})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "nope.ini"), env={})


def test_cross_checks() -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        load_config(overrides={"tls_cert": "/x.pem"}, env={})
    with pytest.raises(ConfigError, match="ratio between 0 and 1"):
        load_config(env={"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"})


def test_bind_and_duration_parsers() -> None:
    assert parse_bind("unix:/run/spoa.sock") == "unix:/run/spoa.sock"
    assert parse_bind(":7000") == "0.0.0.0:7000"
    assert parse_bind("[::1]:7000") == "::1:7000"
    assert parse_duration("500ms") == 0.5 and parse_duration("2m") == 120.0
    assert parse_duration("30") == 30.0


@pytest.mark.parametrize("bind", ["tcp://127.0.0.1:12345", "ipv4@127.0.0.1:12345",
                                  "unix@/run/spoa.sock"])
def test_a_bind_with_a_scheme_or_haproxy_prefix_is_refused_as_such(bind: str) -> None:
    """Black-box run: tcp://127.0.0.1:12345 got "write an IPv6 address in brackets"."""
    with pytest.raises(ValueError, match="without a scheme or an address prefix") as info:
        parse_bind(bind)
    assert "IPv6" not in str(info.value)


def test_one_config_file_only(tmp_path: Path) -> None:
    """Black-box run: ``-c a -c b`` used b alone, silently (HAProxy's -f a -f b loads both)."""
    first, second = tmp_path / "a.ini", tmp_path / "b.ini"
    first.write_text("[listener]\nbind = 127.0.0.1:21003\n")
    second.write_text("[listener]\nbind = 127.0.0.1:21004\n")
    done = run_check("-c", str(first), "-c", str(second))
    assert done.returncode == 2, done
    assert "spoe-agent: error: -c/--config given twice: give one configuration file" in done.stderr
    assert "listening on 127.0.0.1:21003" in run_check("-c", str(first)).stdout


def test_ipv6_binds_are_written_as_bind_takes_them() -> None:
    """--check and the logs wrote ``::1:21001``, which reads as an address without a port."""
    from spoe_agent.config import bind_text

    assert bind_text(parse_bind("[::1]:21001")) == "[::1]:21001"
    assert bind_text(parse_bind("[2001:db8::1]:80")) == "[2001:db8::1]:80"
    assert bind_text(parse_bind("127.0.0.1:21001")) == "127.0.0.1:21001"
    assert bind_text(parse_bind("unix:/run/a:b.sock")) == "unix:/run/a:b.sock"
    check = run_check("--bind", "[::1]:21001")
    assert check.returncode == 0 and "listening on [::1]:21001;" in check.stdout, check


@pytest.mark.parametrize(("bind", "why"), [
    ("unix:/nonexistent/dir/agent.sock", "/nonexistent/dir is not a directory"),
    ("unix:/tmp/" + "x" * 120 + ".sock", "the path is 130 bytes long, and a unix socket's may "
     "be 107 at most"),
    ("192.0.2.1:21002", "Cannot assign requested address"),  # TEST-NET-1: not this machine's
])
def test_check_refuses_a_bind_that_cannot_be_listened_on(bind: str, why: str) -> None:
    """--check said OK, then the start failed: it now probes what it can without taking the
    address (a running agent may hold the port)."""
    check = run_check("--bind", bind)
    assert check.returncode == 2, check
    assert f"configuration error: cannot listen on {bind} (command line): {why}" in (
        check.stderr), check.stderr


def test_an_app_that_fails_to_import_is_named(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """"cannot start: boom" read as the agent's own failure."""
    from spoe_agent.cli import load_app

    (tmp_path / "broken_app.py").write_text("import os\n\nraise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError) as info:
        load_app("broken_app:agent")
    assert str(info.value) == (
        "importing the --app module 'broken_app' failed: RuntimeError: boom "
        f"({tmp_path / 'broken_app.py'}:3)")
    with pytest.raises(ValueError) as info:
        load_app("no_such_app_module:agent")
    assert str(info.value) == ("importing the --app module 'no_such_app_module' failed: "
                               "ModuleNotFoundError: No module named 'no_such_app_module'")


def test_an_app_module_is_found_in_the_current_directory_by_the_console_script(
        tmp_path: Path) -> None:
    """The README's `spoe-agent --app mymodule:agent`, run next to mymodule.py: a console
    script has its bin/ on sys.path, not the current directory."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "spoe-agent").write_text(
        "import sys\nfrom spoe_agent.cli import main\nsys.exit(main())\n")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "mymodule.py").write_text(
        "from spoe_agent.handlers import Agent\nagent = Agent('mine')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, str(tmp_path / "bin" / "spoe-agent"), "--app", "mymodule:agent",
         "--exporter", "none", "--check"],
        cwd=tmp_path / "app", env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "configuration OK" in done.stdout
    # Its own app exports nothing: --check names it, not an exporter (black-box run).
    assert done.stdout.rstrip().endswith("; app mymodule:agent)"), done.stdout
    assert "exporter" not in done.stdout


def test_an_app_factory_that_raises_is_named(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from spoe_agent.cli import _build_agent

    (tmp_path / "factory_app.py").write_text(
        "def make(config):\n    raise RuntimeError('no database')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError) as info:
        _build_agent("factory_app:make", load_config(env={}))
    assert str(info.value) == (
        "the --app factory 'factory_app:make' failed: RuntimeError: no database "
        f"({tmp_path / 'factory_app.py'}:2)")


def test_listener_limits_have_safe_defaults_and_parse_from_the_ini(tmp_path: Path) -> None:
    config = load_config(env={})
    # Longer than HAProxy's usual "timeout idle"/"timeout server" (2-3m): HAProxy closes its
    # idle connections first, the agent only reaps the ones it forgot.
    assert config.idle_timeout == 600.0
    assert config.read_timeout == 30.0
    assert (config.max_connections, config.max_in_flight) == (1000, 64)
    assert (config.max_sessions, config.max_spans_per_session) == (100_000, 64)
    assert config.max_attribute_length == 4096
    path = write(tmp_path, "[listener]\nmax_connections = 5\nmax_in_flight = 3\n"
                           "idle_timeout = 10m\nread_timeout = 1500ms\n[logging]\nformat = json\n"
                           "[metrics]\nbind = 127.0.0.1:9100\n")
    config = load_config(path, env={})
    assert (config.max_connections, config.max_in_flight) == (5, 3)
    assert (config.idle_timeout, config.read_timeout) == (600.0, 1.5)
    assert (config.log_format, config.metrics) == ("json", "127.0.0.1:9100")


def test_unix_mode_is_octal_as_chmod_takes_it(tmp_path: Path) -> None:
    for text, mode in (("660", 0o660), ("0660", 0o660), ("0o600", 0o600), ("", None)):
        assert load_config(write(tmp_path, f"[listener]\nunix_mode = {text}\n"),
                           env={}).unix_mode == mode
    assert load_config(env={}).unix_mode is None  # the umask decides, as before


def test_busy_poll_is_off_unless_the_ini_or_the_flag_asks(tmp_path: Path) -> None:
    from spoe_agent.cli import _overrides, build_parser

    def flags(*argv: str) -> float:
        return load_config(overrides=_overrides(build_parser().parse_args(argv)), env={}).busy_poll

    assert load_config(env={}).busy_poll == 0
    assert flags() == 0
    # true: forever (HAProxy's busy-polling); a duration: that long after each read.
    for text, window in (("yes", math.inf), ("true", math.inf), ("1", math.inf), ("off", 0),
                         ("0", 0), ("1ms", 0.001), ("500us", 0.0005), ("0.002", 0.002)):
        ini = write(tmp_path, f"[listener]\nbusy_poll = {text}\n")
        assert load_config(ini, env={}).busy_poll == pytest.approx(window), text
    assert flags("--busy-poll") == math.inf
    assert flags("--busy-poll", "2ms") == pytest.approx(0.002)
    # A bare number of a second or more is a unit forgotten (black-box run: "2" spun a core
    # for 2 s after every read, while "1" never sleeps): refused.
    for text in ("2", "1.0", "1000"):
        ini = write(tmp_path, f"[listener]\nbusy_poll = {text}\n")
        with pytest.raises(ConfigError, match="give a unit"):
            load_config(ini, env={})
    assert flags("--busy-poll", "--workers", "1") == math.inf  # the next flag is not a window
    flagged = load_config(overrides=_overrides(build_parser().parse_args(["--busy-poll"])), env={})
    assert flagged.sources["busy_poll"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[listener]\nmax_connections = 0\n", "must be between 1 and 1000000"),
        ("[listener]\nmax_connections = 9223372036854775808\n", "must be between 1 and"),
        ("[tracing]\nexport_queue_size = 999999999999999999999\n", "must be between 1 and"),
        ("[tracing]\nsession_ttl = 0\n", "session_ttl: must be more than 0"),
        ("[tracing]\nexport_delay = 0s\n", "export_delay: must be more than 0"),
        ("[tracing]\nexport_timeout = 0\n", "export_timeout: must be more than 0"),
        # The variables count in ms, the file in s: 500 meant 500 ms (black-box run: exports
        # held back for 8 minutes, --check said OK).
        ("[tracing]\n\nexport_delay = 500\n", "agent.ini:3: .*export_delay: 500 seconds\\? A bare "
         "number counts in seconds in agent.ini \\(OTEL_BSP_SCHEDULE_DELAY counts in"),
        ("[tracing]\nexport_timeout = 30000\n", "export_timeout: 30000 seconds\\? .*30000ms"),
        ("[tracing]\njaeger_endpoint = not a url\n", "expected an http:// or https:// URL"),
        ("[tracing]\notlp_endpoint = ftp://x/v1/traces\n", "expected an http:// or https://"),
        ("[tracing]\npropagators = none,tracecontext\n", "'none' cannot be combined"),
        ("[metrics]\nbind = unix:/tmp/m.sock\n", "not on a unix socket"),
        ("[tracing]\nexport_queue_size = 10\nexport_batch_size = 20\n",
         "agent.ini:3: export_batch_size \\(20\\) cannot exceed export_queue_size \\(10\\)"),
        ("[listener]\nmax_in_flight = -1\n", "must be between 1 and 100000"),
        ("[listener]\nidle_timeout = forever\n", "expected a duration"),
        # Black-box run: read_timeout = 1us passed --check, then closed every connection.
        ("[listener]\nread_timeout = 1us\n", "agent.ini:2: .*read_timeout: 1us is too short "
         "to wait for HAProxy: give at least 100ms \\(or 0 to turn it off\\)"),
        ("[listener]\nidle_timeout = 50ms\n", "idle_timeout: 50ms is too short"),
        ("[tracing]\nsession_ttl = 500us\n", "session_ttl: must be at least 1ms, got '500us'"),
        ("[tracing]\nexport_timeout = 1us\n", "export_timeout: must be at least 1ms"),
        ("[tracing]\njaeger_timeout = 0.0001\n", "jaeger_timeout: must be at least 1ms"),
        ("[tracing]\nmax_attribute_length = 0\n", "must be >= 1"),
        ("[listener]\n\nbusy_poll = sometimes\n",
         "agent.ini:3: .*busy_poll: expected true, false or a duration such as 1ms"),
        ("[listener]\nbind = unix:/s\nunix_mode = rw-rw----\n",
         "agent.ini:3: \\[listener\\] unix_mode: expected octal permissions such as 660"),
        ("[listener]\nunix_mode = 680\n", "agent.ini:2: .*expected octal permissions"),
        ("[listener]\nunix_mode = 1777\n", "agent.ini:2: .*expected octal permissions"),
        ("[listener]\n\nunix_group = no-such-group-here\n",
         "agent.ini:3: .*unix_group: no group named 'no-such-group-here'"),
    ],
)
def test_limits_refuse_unsafe_values(tmp_path: Path, text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        load_config(write(tmp_path, text), env={})


def test_service_name_from_resource_attributes_when_nothing_more_specific(tmp_path: Path) -> None:
    attrs = {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=edge%20lb"}
    config = load_config(env=attrs)
    assert config.service_name == "edge lb"
    assert config.sources["service_name"] == "environment variable OTEL_RESOURCE_ATTRIBUTES"
    assert load_config(env={**attrs, "OTEL_SERVICE_NAME": "named"}).service_name == "named"
    path = write(tmp_path, "[tracing]\nservice_name = from-ini\n")
    assert load_config(path, env=attrs).service_name == "from-ini"
    assert load_config(env={"OTEL_RESOURCE_ATTRIBUTES": "a=b"}).service_name == "haproxy"
    assert load_config(env={"OTEL_RESOURCE_ATTRIBUTES": " a=b ,c=, d = e "}).service_name == "haproxy"
    assert load_config(env={"OTEL_RESOURCE_ATTRIBUTES": "  "}).service_name == "haproxy"


@pytest.mark.parametrize(("value", "reason"), [
    ("foo,team=a", "member 1 is not key=value"),
    ("team=a,=v", "member 2 is not key=value"),
    ("team=a, ,secret-token", "member 2 is not key=value"),
    ("team=a,", "member 2 is not key=value"),
    (",team=a", "member 1 is not key=value"),
    ("service.name=secret-token%0Alb", "service.name: control characters"),
    ("team=a,note=secret-token%zz", "member 2: a '%' not followed by two hex digits"),
    ("team=secret-token%", "member 1: a '%' not followed by two hex digits"),
    ("team=secret-token%FF", "member 1: its percent-encoded bytes are not UTF-8"),
])
def test_a_malformed_resource_attributes_value_is_refused_whole(value: str, reason: str) -> None:
    """The SDK would drop the bad member with a warning and keep the rest; the resource
    specification says to discard the whole value and report it: refused at start, as any bad
    OTEL_* value, and even when OTEL_SERVICE_NAME names the service. No value is echoed."""
    for env in ({"OTEL_RESOURCE_ATTRIBUTES": value},
                {"OTEL_RESOURCE_ATTRIBUTES": value, "OTEL_SERVICE_NAME": "named"}):
        with pytest.raises(ConfigError, match=f"OTEL_RESOURCE_ATTRIBUTES: {reason}") as info:
            load_config(env=env)
        assert "secret-token" not in str(info.value)


@pytest.mark.parametrize("text", ["[tracing]\nservice_name =\n",
                                  "[tracing]\njaeger_agent_host =\n",
                                  "[tracing]\npropagators =\n"])
def test_settings_that_cannot_be_empty(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="agent.ini:2: .*(must not be empty|no propagator)"):
        load_config(write(tmp_path, text), env={})


def test_flags_take_any_case_and_busy_poll_can_be_turned_off(tmp_path: Path) -> None:
    from spoe_agent.cli import _overrides, build_parser

    args = build_parser().parse_args(["--exporter", "Jaeger", "--log-level", "INFO",
                                      "--no-busy-poll"])
    path = write(tmp_path, "[listener]\nbusy_poll = true\n")
    config = load_config(path, _overrides(args), env={})
    assert (config.exporter, config.log_level, config.busy_poll) == ("jaeger", "INFO", 0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--exporter", "zipkin"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--service-name", ""], "argument --service-name: must not be empty"),
        (["--service-name", "   "], "argument --service-name: must not be empty"),
        (["--exporter", "zipkin"], "argument --exporter: expected one of jaeger, otlp"),
        (["--log-level", "loud"], "argument --log-level: expected one of debug"),
        (["--log-format", "xml"], "argument --log-format: expected one of text, json"),
        (["--bind", "nowhere"], "argument --bind: expected HOST:PORT"),
        (["--metrics", "unix:/m.sock"], "argument --metrics: the metrics endpoint listens"),
        (["--workers", "0"], "argument --workers: must be between 1 and 256"),
    ],
)
def test_flags_are_refused_as_agent_ini_refuses_the_same_value(
        capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    """A flag's value goes through its option's own parser: ``--service-name ''`` made spans
    of unknown_service where ``service_name =`` in agent.ini is refused."""
    from spoe_agent.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_flag_values_are_normalised_as_the_file_normalises_them() -> None:
    from spoe_agent.cli import _overrides, build_parser

    args = build_parser().parse_args(["--service-name", "  padded  ", "--bind", "[::1]:7000",
                                      "--log-level", "Debug", "--exporter", " OTLP "])
    config = load_config(overrides=_overrides(args), env={})
    assert (config.service_name, config.bind) == ("padded", "::1:7000")
    assert (config.log_level, config.exporter) == ("DEBUG", "otlp")


@pytest.mark.parametrize(("given", "host"), [
    ("jaeger-agent", "jaeger-agent"), ("jaeger_agent", "jaeger_agent"), ("10.0.0.7", "10.0.0.7"),
    ("::1", "::1"), ("[::1]", "::1"),
])
def test_the_jaeger_agent_host_is_a_name_or_an_address(given: str, host: str) -> None:
    """An IPv6 address in brackets, as in a URL, is the address: the send would fail on it."""
    config = load_config(env={"OTEL_EXPORTER_JAEGER_AGENT_HOST": given})
    assert config.jaeger_agent_host == host


def test_max_open_bytes_takes_sizes_as_haproxy_writes_them(tmp_path: Path) -> None:
    assert load_config(env={}).max_open_bytes == 256 << 20
    for text, size in (("256m", 256 << 20), ("1g", 1 << 30), ("512 MiB", 512 << 20),
                       ("2048k", 2 << 20), ("1048576", 1 << 20), ("64MB", 64 << 20)):
        assert parse_size(text) == size, text
    path = write(tmp_path, "[tracing]\nmax_open_bytes = 64m\n")
    assert load_config(str(path), env={}).max_open_bytes == 64 << 20
    for bad, reason in (("lots", "expected a size such as 256m"), ("1k", "must be at least 1m"),
                        ("-5m", "expected a size")):
        path = write(tmp_path, f"[tracing]\n\nmax_open_bytes = {bad}\n")
        with pytest.raises(ConfigError, match=f"agent.ini:3: .*max_open_bytes: {reason}"):
            load_config(str(path), env={})


def test_check_refuses_a_metrics_address_this_machine_does_not_have() -> None:
    """Code review: --check said OK, and the start then failed on it."""
    done = run_check("--metrics", "192.0.2.1:9464", "--exporter", "none")  # TEST-NET-1
    assert done.returncode == 2, done
    assert ("configuration error: cannot serve metrics on 192.0.2.1:9464 (command line): "
            "Cannot assign requested address") in done.stderr
    assert run_check("--metrics", "127.0.0.1:9464", "--exporter", "none").returncode == 0


def test_an_inline_comment_on_a_header_and_bare_cr_line_ends_keep_line_numbers_right(
        tmp_path: Path) -> None:
    """Code review: "[tracing] ; see [docs]" made every error of the section say "?" for its
    line, and a non-UTF-8 byte in an old Mac file (bare CRs) was always on line 1."""
    path = write(tmp_path, "[tracing] ; see [docs]\nsession_ttl = banana\n")
    with pytest.raises(ConfigError, match=r"agent.ini:2: \[tracing\] session_ttl: "):
        load_config(path, env={})
    (tmp_path / "agent.ini").write_bytes(b"[tracing]\rsession_ttl = 5s\r\r\xff = 1\r")
    with pytest.raises(ConfigError, match=r"agent.ini:4: not UTF-8 text"):
        load_config(path, env={})
