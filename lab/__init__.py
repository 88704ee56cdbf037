"""Development tools shared by the demo, the benchmarks and the tests (not installed): a private
nginx running the shipped exporter (``lab.nginx``)."""
