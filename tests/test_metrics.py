"""`/metrics` through the app over the fake engine: it parses as Prometheus's text
format, and its counters move by the known token counts of known requests."""

from prometheus_client.parser import text_string_to_metric_families

from tests.fake_model import CHAT, HELLO_PROMPT_TOKENS, chat_body, sse_events

REPLY_TOKENS = 13


def scrape(client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(reply.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_counters_move_by_the_tokens_of_known_requests(serve):
    client = serve(api_keys=["k"], response_cache_ttl=60)  # /metrics needs no key
    auth = {"Authorization": "Bearer k"}
    before = scrape(client)
    assert client.post(CHAT, json=chat_body(), headers=auth).status_code == 200
    streamed = client.post(CHAT, json=chat_body(stream=True), headers=auth)
    assert sse_events(streamed)[-1] == "[DONE]"
    streamed.close()
    assert client.post(CHAT, json=chat_body(model="nope"), headers=auth).status_code == 404
    for _ in range(2):  # a miss, then a hit that the engine never sees
        assert client.post(CHAT, json=chat_body(temperature=0), headers=auth).status_code == 200
    after = scrape(client)

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    generated = 3  # the plain, streamed and missed requests
    assert moved("jaxchat:prompt_tokens_total") == generated * HELLO_PROMPT_TOKENS
    assert moved("jaxchat:generation_tokens_total") == generated * REPLY_TOKENS
    assert moved("jaxchat:request_success_total", finished_reason="stop") == generated
    assert moved("jaxchat:request_prompt_tokens_sum") == generated * HELLO_PROMPT_TOKENS
    assert moved("jaxchat:request_generation_tokens_count") == generated
    assert moved("jaxchat:e2e_request_latency_seconds_count") == generated
    assert moved("jaxchat:time_to_first_token_seconds_count") == generated
    assert moved("jaxchat:time_per_output_token_seconds_count") == generated
    assert after[("jaxchat:time_to_first_token_seconds_bucket", (("le", "+Inf"),))] == generated
    route = "/chat/completions"
    assert moved("jaxchat:http_requests_total", route=route, status="200") == 4
    assert moved("jaxchat:http_requests_total", route=route, status="404") == 1
    assert moved("jaxchat:response_cache_queries_total", result="miss") == 1
    assert moved("jaxchat:response_cache_queries_total", result="hit") == 1


def test_engine_state_is_read_from_the_scheduler_at_each_scrape(serve):
    samples = scrape(serve())
    # FakeLLM.stats: 2 running, 3 waiting, 25 of 100 blocks held, 7 hit (121 positions),
    # 40 steps in 2 s, 12 drafted and 9 taken, 1 executable still loading.
    assert samples[("jaxchat:num_requests_running", ())] == 2
    assert samples[("jaxchat:num_requests_waiting", ())] == 3
    assert samples[("jaxchat:kv_cache_usage_perc", ())] == 0.25
    assert samples[("jaxchat:prefix_cache_hit_blocks_total", ())] == 7
    assert samples[("jaxchat:prefix_cache_hit_tokens_total", ())] == 121
    assert samples[("jaxchat:engine_step_seconds_count", ())] == 40
    assert samples[("jaxchat:engine_step_seconds_sum", ())] == 2.0
    assert samples[("jaxchat:spec_decode_num_draft_tokens_total", ())] == 12
    assert samples[("jaxchat:spec_decode_num_accepted_tokens_total", ())] == 9
    assert samples[("jaxchat:executables_pending", ())] == 1


def test_paths_become_bounded_route_labels(serve):
    client = serve()
    before = scrape(client)
    for path in ("/v1/models/x", "/models/y", "/secret/probe/1", "/secret/probe/2"):
        client.get(path)
    after = scrape(client)
    key = ("jaxchat:http_requests_total", (("route", "/models/{id}"), ("status", "200")))
    assert key not in after  # both unknown models: 404
    key = ("jaxchat:http_requests_total", (("route", "/models/{id}"), ("status", "404")))
    assert after[key] - before.get(key, 0) == 2
    key = ("jaxchat:http_requests_total", (("route", "other"), ("status", "404")))
    assert after[key] - before.get(key, 0) == 2
