"""Pure data exchanged between processes; no I/O.

messages   versioned wire messages (Forward, Token, Close, ErrorReply) with raw tensor payloads
"""
