"""What the bench is held to: its headline numbers and their targets, each a floor or, in ``AT_MOST``, a
ceiling. ``run.summarize`` judges a run by them; ``report`` writes them as the headline table (and first in
``latest.json``), in this order.
"""

#: Targets of the performance issue (2-core CPU machine, ratios from one run), and of the crowd-load issue
#: at 5x the graph's capacity: answers within budget + 0.25 s, refusals fast and with Retry-After, goodput kept.
#: And of the peers issue: against LitServe at 16 clients (mixed frames and text-sign frames), and p50 at one client.
TARGETS = {"overhead_ms_p50": 10.0, "throughput_ratio_nodescribe": 1.0, "throughput_ratio_describe": 1.5,
           "graph_rss_gb": 6.0, "overload_within_budget_5x": 0.99, "overload_shed_fast_5x": 0.95,
           "overload_goodput_ratio_5x": 0.8, "peer_goodput_ratio_c16": 1.0, "peer_goodput_ratio_c16_text": 1.0,
           "peer_p50_delta_ms_c1": 10.0}
AT_MOST = ("overhead_ms_p50", "graph_rss_gb", "peer_p50_delta_ms_c1")  # targets that are ceilings
