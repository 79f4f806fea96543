// Opens kilnd's dashboard once in headless Chromium and watches it update without reloading:
//   node dashboard.mjs URL SCREENSHOT_DIR [ADDRESS [BUSY_SERVICE [DRAIN]]]
// Prints "READY <instance ids>" when the service and its healthy instances show, then waits
// (the test changes the manifest meanwhile) until instances of revision 2 show healthy and the
// old ones are gone and the history view lists revisions 2 and 1, prints "UPDATED", saves
// screenshots and exits 0. Exits 1 on any failure.
// With ADDRESS (the service's `expose:` HOST:PORT): before READY the service also shows that
// address and a proxy listening on it with exactly its instances in the pool, and BUSY_SERVICE
// (whose address is taken) shows its proxy's bind error; after the rollout the pool holds
// exactly the instances of revision 2. With DRAIN ("drain"; the test holds a connection through
// the address open across the rollout): an instance row shows the drain line of the instance
// that connection goes to, "draining: 1 open connection, 59s left"; prints "DRAINING <line>" and
// goes on (the test then closes its connection).
import { chromium } from "playwright-core";

const [url, shots, address, busy, drain] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(url);
  const rows = (rev) => page.locator(`section[data-service="web"] tr[data-instance]`).evaluateAll(
    (trs, rev) => trs.map((tr) => ({ id: tr.dataset.instance, rev: tr.children[1].textContent,
                                     state: tr.querySelector(".state").textContent })), rev);
  const waitFor = async (what, pred, ms) => {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      const r = await rows();
      if (pred(r)) return r;
      await page.waitForTimeout(200);
    }
    throw new Error(`timed out waiting for ${what}; rows: ${JSON.stringify(await rows())}`);
  };
  const first = await waitFor("2 healthy instances of revision 1",
    (r) => r.length === 2 && r.every((x) => x.rev === "1" && x.state === "healthy"), 30000);
  // The pool as the page shows it: per proxy route its listener line and its endpoint rows.
  const pool = () => page.locator(`section[data-service="web"] .route`).evaluateAll((divs) =>
    divs.map((d) => ({ listener: d.querySelector("h3").textContent.replace(/\s+/g, " "),
                       endpoints: [...d.querySelectorAll("tr[data-endpoint]")].map((tr) => ({
                         id: tr.dataset.endpoint, rev: tr.children[1].textContent,
                         state: tr.querySelector(".ep-state").textContent })) })));
  const poolHolds = async (what, ids, rev, ms) => {
    const end = Date.now() + ms;
    let p = [];
    while (Date.now() < end) {
      p = await pool();
      const inPool = p.length === 1 ? p[0].endpoints.filter((e) => e.state === "in pool") : [];
      if (p.length === 1 && p[0].listener.includes("listening on " + address) &&
          inPool.length === ids.length && inPool.every((e) => ids.includes(e.id) && e.rev === rev))
        return;
      await page.waitForTimeout(200);
    }
    throw new Error(`timed out waiting for ${what}; pool: ${JSON.stringify(p)}`);
  };
  if (address) {
    const shown = await page.locator(`section[data-service="web"] h2 .address`).textContent();
    if (shown !== address) throw new Error(`address shows "${shown}", not "${address}"`);
    await poolHolds("the proxy listening with both instances in the pool", first.map((x) => x.id),
                    "1", 30000);
  }
  if (busy) {
    const bindError = page.locator(`section[data-service="${busy}"] .route .bind-error`);
    await bindError.waitFor({ timeout: 30000 });
    const text = await bindError.textContent();
    if (!text.startsWith("cannot listen on ")) throw new Error(`bind error shows "${text}"`);
    const degraded = await page.locator(`section[data-service="${busy}"] .conditions .true-Degraded`).count();
    if (degraded !== 1) throw new Error("the service with a taken address is not Degraded");
  }
  const version = await page.locator(`section[data-service="web"] h2 .pill`).textContent();
  if (version !== "version 1.0") throw new Error(`version shows "${version}"`);
  await page.screenshot({ path: `${shots}/dashboard-before.png`, fullPage: true });
  console.log("READY " + first.map((x) => x.id).join(" "));
  if (drain) {
    const line = page.locator(`section[data-service="web"] tr[data-instance] .drain`).first();
    await line.waitFor({ timeout: 60000 });
    const text = await line.textContent();
    if (!/^draining: 1 open connection, [0-9hms]+ left$/.test(text)) {
      throw new Error(`drain line shows "${text}"`);
    }
    await page.screenshot({ path: `${shots}/dashboard-draining.png`, fullPage: true });
    console.log("DRAINING " + text);
  }
  // Same page, no reload: the rollout appears as it happens.
  const second = await waitFor("2 healthy instances of revision 2 and no old ones",
    (r) => r.length === 2 && r.every((x) => x.rev === "2" && x.state === "healthy"), 60000);
  if (address) {
    await poolHolds("the instances of revision 2 in the pool", second.map((x) => x.id), "2", 30000);
  }
  // The history view lists both revisions, newest first.
  const history = await page.locator(`section[data-service="web"] .history tr[data-revision]`)
    .evaluateAll((trs) => trs.map((tr) => tr.dataset.revision));
  if (history.join(",") !== "2,1") throw new Error(`history shows revisions ${JSON.stringify(history)}`);
  const events = await page.locator("#events tbody").textContent();
  if (!events.includes("rollout_completed")) throw new Error("events do not show the rollout");
  await page.screenshot({ path: `${shots}/dashboard-after.png`, fullPage: true });
  console.log("UPDATED");
} catch (err) {
  console.log("FAILED " + err.message);
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
