"""Pure scheduling decisions (no I/O), unit-testable and reusable by a simulator.

placement   the glue the coordinator uses: a pack's fragments as placement units (PackLayout,
            memory per unit), measured layers/s to units/s, place (plan_spans first, then
            rebalance; gaps first while memory is short), changed_spans, and route_layers
            (plan_route over ready spans with measured round trips)
capacity    NodeCapacity (memory, MEASURED layers_per_s) and ModelShape (bytes per layer with its
            KV budget, max_layers)
spans       plan_spans: one contiguous layer span per node, sized by measured throughput, every
            layer covered with min_replicas copies, maximising the bottleneck layer throughput;
            bottleneck_throughput; even_spans (the naive baseline); rebalance: keep, patch with
            few moves, or replan, only when the gain beats min_gain (stable: no thrashing)
routing     HostView; plan_route: the minimum-latency ring client -> hosts -> client over layer
            positions (round trip plus compute scaled by load and queue), mixing replicas, with
            exclude for failover
"""
