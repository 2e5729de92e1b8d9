"""Pure scheduling decisions (no I/O), unit-testable and reusable by a simulator.

placement   which fragment a joining node hosts; which nodes a request's route uses (even fill,
            least-loaded host; in use until spans/routing replace it)
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
