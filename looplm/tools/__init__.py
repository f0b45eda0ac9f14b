"""Tools around the core: the benchmark (bench/) and the plugin conformance battery
(conformance/). They depend on the core; the core never imports them."""
