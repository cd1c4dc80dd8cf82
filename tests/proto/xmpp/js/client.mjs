// A second, independent XMPP client for the tests: xmpp.js (@xmpp/client 0.14).
// node client.mjs PORT USER PASSWORD TO BODY EXPECT
// Logs in (plaintext: xmpp.js then uses SCRAM-SHA-1), asks for the roster, sends
// initial presence, sends BODY to TO (if TO is not "-"), prints one JSON line per
// event, and exits after EXPECT chat messages arrived (or after 15 s, with code 2).
import { client, xml } from "@xmpp/client";

const [port, username, password, to, body, expect] = process.argv.slice(2);
const out = (o) => console.log(JSON.stringify(o));
const xmpp = client({ service: `xmpp://127.0.0.1:${port}`, domain: "localhost", username, password,
                      resource: "js" });
let got = 0;
const timer = setTimeout(() => { out({ event: "timeout" }); process.exit(2); }, 15000);

xmpp.on("error", (err) => out({ event: "error", text: String(err) }));
xmpp.on("stanza", async (stanza) => {
  if (stanza.is("message") && stanza.getChild("body")) {
    const delay = stanza.getChild("delay", "urn:xmpp:delay");
    out({ event: "message", from: stanza.attrs.from, body: stanza.getChildText("body"),
          delay: delay ? delay.attrs.stamp : null });
    got += 1;
    if (got >= Number(expect)) {
      clearTimeout(timer);
      await xmpp.stop();
      process.exit(0);
    }
  }
});
xmpp.on("online", async (address) => {
  out({ event: "online", jid: address.toString() });
  const roster = await xmpp.iqCaller.request(xml("iq", { type: "get" }, xml("query", "jabber:iq:roster")));
  out({ event: "roster", items: roster.getChild("query").getChildren("item").map((i) => i.attrs.jid) });
  await xmpp.send(xml("presence"));
  if (to !== "-") {
    await xmpp.send(xml("message", { type: "chat", to }, xml("body", {}, body)));
    out({ event: "sent" });
  }
  if (Number(expect) === 0) {
    clearTimeout(timer);
    await xmpp.stop();
    process.exit(0);
  }
});
xmpp.start().catch((err) => { out({ event: "failed", text: String(err) }); process.exit(1); });
