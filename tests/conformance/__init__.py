"""
A WebSocket conformance suite for the console proxy, ported from Autobahn|Testsuite's
fuzzingclient cases and run in memory against the real ConsoleProtocol.
"""
