"""The engine metrics vLLM 0.32 exports, under vLLM's own names, so dashboards and the gateway's scrapes read an
emulator as they read vLLM."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.metrics import VLLM_E2E_BUCKETS, VLLM_ITL_BUCKETS, VLLM_TTFT_BUCKETS


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        labels = ("model_name", "engine")
        lv = (model, "0")

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self.running = Gauge("vllm:num_requests_running", "Requests running.", labels, registry=registry).labels(*lv)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting.", labels, registry=registry).labels(*lv)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 0-1.", labels, registry=registry).labels(*lv)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens.", labels, registry=registry).labels(*lv)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens.", labels, registry=registry
        ).labels(*lv)
        self.success = Counter(
            "vllm:request_success", "Finished requests.", (*labels, "finished_reason"), registry=registry
        )
        for reason in ("stop", "length", "abort"):
            self.success.labels(*lv, reason)
        self.preemptions = Counter("vllm:num_preemptions", "Preemptions.", labels, registry=registry).labels(*lv)
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prefix-cache queries (tokens).", labels, registry=registry
        ).labels(*lv)
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prefix-cache hits (tokens).", labels, registry=registry
        ).labels(*lv)
        self.ttft = hist("vllm:time_to_first_token_seconds", "TTFT.", VLLM_TTFT_BUCKETS).labels(*lv)
        self.itl = hist("vllm:inter_token_latency_seconds", "ITL.", VLLM_ITL_BUCKETS).labels(*lv)
        self.tpot = hist("vllm:request_time_per_output_token_seconds", "TPOT.", VLLM_ITL_BUCKETS).labels(*lv)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "E2E.", VLLM_E2E_BUCKETS).labels(*lv)
        self.queue = hist("vllm:request_queue_time_seconds", "Queue time.", VLLM_E2E_BUCKETS).labels(*lv)
        self.prefill = hist("vllm:request_prefill_time_seconds", "Prefill.", VLLM_E2E_BUCKETS).labels(*lv)
        self.decode = hist("vllm:request_decode_time_seconds", "Decode.", VLLM_E2E_BUCKETS).labels(*lv)
        self.inference = hist("vllm:request_inference_time_seconds", "Inference.", VLLM_E2E_BUCKETS).labels(*lv)
        self.req_prompt = hist(
            "vllm:request_prompt_tokens",
            "Prompt tokens per request.",
            (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
        ).labels(*lv)
        self.req_generation = hist(
            "vllm:request_generation_tokens",
            "Generated tokens per request.",
            (1, 2, 5, 10, 20, 50, 100, 200, 500),
        ).labels(*lv)
