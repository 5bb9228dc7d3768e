"""Test helpers shared by the integration and reliability tiers.

One of each: a gateway process (:mod:`.gateway`), a TCP proxy that can cut or
freeze what it carries (:mod:`.proxy`), a wait (:mod:`.wait`), the gateway's
HTTP surface seen from outside (:mod:`.probe`), and a reader of the frames a
server sends, built on the websockets library's own parser (:mod:`.frames`,
:mod:`.raw_client`). Nothing here knows a tier's fixtures.
"""
