"""What the bench is held to: its headline numbers and their targets, each a floor or, in ``AT_MOST``, a
ceiling. ``run.summarize`` judges a run by them; ``report`` writes them as the headline table (and first in
``latest.json``), in this order.
"""

#: Targets on a 2-core CPU machine: of the performance issue (overhead at one client, describe=true against the
#: baseline, memory); of the crowd-load issue at 5x the graph's capacity (answers within budget + 0.25 s, refusals
#: fast and with Retry-After, goodput kept); and of issue 30, against the tuned LitServe peer: goodput at 16
#: clients on every frame set and describe=true peak, p50 at one client, and serving efficiency on mixed frames.
#: Ratios between systems are medians of the interleaved rounds' ratios (``run.summarize``).
TARGETS = {"overhead_ms_p50": 10.0, "throughput_ratio_nodescribe": 1.0, "throughput_ratio_describe": 1.5,
           "graph_rss_gb": 6.0, "overload_within_budget_5x": 1.0, "overload_shed_fast_5x": 0.98,
           "overload_goodput_ratio_5x": 0.85, "peer_goodput_ratio_c16": 1.2, "peer_goodput_ratio_c16_text": 1.2,
           "peer_goodput_ratio_c16_no_text": 1.2, "peer_goodput_ratio_describe": 1.1, "peer_p50_delta_ms_c1": 5.0,
           "serving_efficiency": 0.6}
AT_MOST = ("overhead_ms_p50", "graph_rss_gb", "peer_p50_delta_ms_c1")  # targets that are ceilings

#: The suffix each frame set's headline keys carry (``peer_goodput_ratio_c16_text``, ``serving_efficiency_no_text``).
FRAME_TAGS = {"mixed": "", "text_signs": "_text", "no_text": "_no_text"}
