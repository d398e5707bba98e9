"""An audit of `jllm serve`'s flags: each engine flag reaches EngineArgs (whose fields the
engine tests cover), and each server or frontend flag names the test that shows its
effect, so a flag added without one fails here."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

from jllm.engine.arg_utils import EngineArgs
from jllm.entrypoints.openai.cli_args import make_arg_parser

TESTS = os.path.dirname(os.path.abspath(__file__))
# Flag (its argparse dest) -> "module.py::test" showing what it does.
SERVER_FLAG_TESTS = {
    "host": "test_server_metrics_auth.py::test_every_configured_key_is_accepted",
    "port": "test_server_metrics_auth.py::test_every_configured_key_is_accepted",
    "uds": "test_server_metrics_auth.py::test_flag_key_wins_over_the_environment_on_a_unix_socket",
    "uvicorn_log_level": "test_server_metrics_auth.py::test_uvicorn_log_flags",
    "disable_uvicorn_access_log": "test_server_metrics_auth.py::test_uvicorn_log_flags",
    "api_key": "test_server_metrics_auth.py::test_v1_routes_refuse_a_missing_or_wrong_key",
    "root_path": "test_server_metrics_auth.py::test_env_api_key_guards_every_protected_route",
    "max_request_body_bytes": "test_server_bad_requests.py::test_bad_request_gets_vllm_error",  # body_too_large
    "enable_request_id_headers": "test_server_conformance.py::test_x_request_id_is_echoed_or_made",
    "enable_server_load_tracking": "test_server_conformance.py::test_load_counts_generation_requests_in_flight",
    "enable_tokenizer_info_endpoint": "test_server_conformance.py::test_tokenizer_info_is_the_tokenizer_config",
    "chat_template": "test_server_openai_client.py::test_chat_template_flag_reads_a_file_or_a_literal",
    "trust_request_chat_template": "test_server_openai_client.py::test_a_request_chat_template_is_honoured_when_trusted",
    "response_role": "test_server_conformance.py::test_response_role_names_the_reply",
    "enable_log_requests": "test_server_metrics_auth.py::test_request_log_lines_cut_the_prompt_to_max_log_len",
    "max_log_len": "test_server_metrics_auth.py::test_request_log_lines_cut_the_prompt_to_max_log_len",
    "return_tokens_as_token_ids": "test_server_conformance.py::test_tokens_as_token_ids_by_request_and_by_server_flag",
    "enable_force_include_usage": "test_server_conformance.py::test_force_include_usage_ends_every_stream_with_usage",
    "enable_prompt_tokens_details": "test_server_conformance.py::test_prompt_tokens_details_count_prefix_cache_hits",
    "disable_log_stats": "test_server_metrics_auth.py::test_metrics_parse_and_move_by_what_was_served",
}


def serve_flags() -> set[str]:
    parser = make_arg_parser(argparse.ArgumentParser())
    return {action.dest for action in parser._actions if action.dest != "help"}


def test_every_engine_flag_is_an_engine_argument_and_every_other_flag_has_a_test():
    engine_fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert serve_flags() - engine_fields == set(SERVER_FLAG_TESTS) - engine_fields


def test_the_named_tests_exist():
    for reference in SERVER_FLAG_TESTS.values():
        module, test = reference.split("::")
        with open(os.path.join(TESTS, module)) as f:
            assert re.search(rf"^def {test}\(", f.read(), re.MULTILINE), reference
