// Opens kilnd's dashboard once in headless Chromium and watches it update without reloading:
//   node dashboard.mjs URL SCREENSHOT_DIR
// Prints "READY <instance ids>" when the service and its healthy instances show, then waits
// (the test changes the manifest meanwhile) until instances of revision 2 show healthy and the
// old ones are gone, prints "UPDATED", saves screenshots and exits 0. Exits 1 on any failure.
import { chromium } from "playwright-core";

const [url, shots] = process.argv.slice(2);
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
  const version = await page.locator(`section[data-service="web"] h2 .pill`).textContent();
  if (version !== "version 1.0") throw new Error(`version shows "${version}"`);
  await page.screenshot({ path: `${shots}/dashboard-before.png`, fullPage: true });
  console.log("READY " + first.map((x) => x.id).join(" "));
  // Same page, no reload: the rollout appears as it happens.
  await waitFor("2 healthy instances of revision 2 and no old ones",
    (r) => r.length === 2 && r.every((x) => x.rev === "2" && x.state === "healthy"), 60000);
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
