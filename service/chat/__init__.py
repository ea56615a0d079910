"""Chat as one capability: conversations kept, and a turn run on them.

- `conversations`: messages as values, their wire shape, sanitising and the model's context
  (pure).
- `stores`: where conversations live (SQLite by default, Redis), with each conversation's turn
  lease.
- `holders`: who holds a turn, named after its process so a killed holder is freed at once.
- `checkpoints`: one task saving the text of every answer still streaming, once per interval.
- `turns`: the shell the app holds, `Chats`: one turn as one async context, end to end.

Dependencies run `turns` -> `checkpoints` -> `stores` -> `conversations`, and `turns` ->
`holders`; `turns` reaches the stream layer only through `relay.Result` and `relay.Meter` (and a
turn's `progress`, which the chat route sets to its generation's `text_so_far`).
"""
