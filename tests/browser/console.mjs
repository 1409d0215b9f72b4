// Headless-browser test of the web console served at `/`.
//
//   node tests/browser/console.mjs http://127.0.0.1:8080
//
// Needs Chromium ($CHROMIUM or /usr/bin/chromium) and `npm ci --prefix tests/browser`.
// The server must run with auth mode `none` and an API open to anonymous
// callers (tests/console.rs starts one). Exits 0 when every step passed,
// otherwise prints the failed step and exits 1.
import { chromium } from 'playwright-core';

const STEP_MS = 10_000;
const base = (process.argv[2] || '').replace(/\/+$/, '');
if (!/^https?:\/\//.test(base)) {
  console.error('usage: node console.mjs <server base URL, e.g. http://127.0.0.1:8080>');
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';

let browser;
let page;
let current = 'start';
const pageErrors = [];
const consoleLines = [];

async function step(name, fn) {
  current = name;
  const started = Date.now();
  await fn();
  console.log(`ok   ${name} (${Date.now() - started} ms)`);
}

// A log entry of `type` received from the server, optionally containing `text`.
function entry(type, text) {
  const loc = page.locator(`#log .entry[data-dir="in"][data-type="${type}"]`);
  return text === undefined ? loc : loc.filter({ hasText: text });
}

async function apiPost(path, body) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), STEP_MS);
  try {
    const resp = await fetch(`${base}${path}`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
      signal: ctl.signal,
    });
    const text = await resp.text();
    if (!resp.ok) throw new Error(`POST ${path}: HTTP ${resp.status}: ${text}`);
    return JSON.parse(text);
  } finally {
    clearTimeout(timer);
  }
}

async function main() {
  await step(`launch ${executablePath}`, async () => {
    browser = await chromium.launch({
      executablePath,
      headless: true,
      args: ['--no-sandbox'],
      timeout: 30_000,
    });
    page = await browser.newPage();
    page.setDefaultTimeout(STEP_MS);
    page.on('pageerror', (e) => pageErrors.push(String(e && e.stack ? e.stack : e)));
    page.on('console', (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
  });

  await step('GET / shows the console', async () => {
    const resp = await page.goto(`${base}/`, { timeout: STEP_MS, waitUntil: 'load' });
    if (!resp || resp.status() !== 200) throw new Error(`GET / answered ${resp ? resp.status() : 'nothing'}`);
    await page.locator('#connect').waitFor({ state: 'visible' });
    const title = await page.title();
    if (!/switchboard/i.test(title)) throw new Error(`unexpected title ${JSON.stringify(title)}`);
    const url = await page.inputValue('#url');
    if (url.replace(/\/+$/, '') !== base) throw new Error(`#url defaults to ${JSON.stringify(url)}, not the page's origin ${base}`);
  });

  await step('connect as alice: a connected event', async () => {
    await page.fill('#userId', 'alice');
    await page.click('#connect');
    const welcome = entry('connected').first();
    await welcome.waitFor();
    const text = await welcome.textContent();
    if (!text.includes('"alice"')) throw new Error(`the welcome does not name alice: ${text}`);
    await page.waitForFunction(() => document.getElementById('state').dataset.state === 'connected', null, { timeout: STEP_MS });
    const shown = await page.textContent('#connUserId');
    if (shown !== 'alice') throw new Error(`the header shows user ${JSON.stringify(shown)}`);
  });

  await step('subscribe to public:demo', async () => {
    await page.fill('#channel', 'public:demo');
    await page.click('#subscribe');
    await entry('subscribed', 'public:demo').first().waitFor();
    await page.locator('#subs li.sub[data-channel="public:demo"]').waitFor();
  });

  await step('a publish through the HTTP API (from node) shows as a message', async () => {
    const r = await apiPost('/api/publish', { channel: 'public:demo', data: { hello: 'browser' } });
    if (r.channel !== 'public:demo' || typeof r.connections !== 'number' || r.connections < 1) {
      throw new Error(`unexpected answer ${JSON.stringify(r)}`);
    }
    const msg = entry('message', 'browser').first();
    await msg.waitFor();
    const text = await msg.textContent();
    if (!text.includes('public:demo') || !text.includes('"hello"')) throw new Error(`unexpected entry: ${text}`);
  });

  await step('publish over the WebSocket from the page', async () => {
    await page.fill('#pubChannel', 'public:demo');
    await page.fill('#pubData', '{"hello":"websocket","n":12345678901234567890}');
    await page.click('#publishWs');
    const msg = entry('message', 'websocket').first();
    await msg.waitFor();
    // The data is shown as the server forwarded it: the big integer is intact.
    const text = await msg.textContent();
    if (!text.includes('12345678901234567890')) throw new Error(`the number was altered: ${text}`);
    const n = await entry('message').count();
    if (n < 2) throw new Error(`${n} message entries, expected 2`);
  });

  await step('publish via the API button', async () => {
    await page.fill('#pubData', 'plain text from the api button');
    await page.click('#publishApi');
    await entry('message', 'plain text from the api button').first().waitFor();
    await page.locator('#pubResult.ok').filter({ hasText: 'offset' }).waitFor();
  });

  await step('send a direct message to alice (WebSocket and API)', async () => {
    await page.fill('#sendTo', 'alice');
    await page.fill('#sendData', '{"note":"direct over ws"}');
    await page.click('#sendWs');
    await entry('direct', 'direct over ws').first().waitFor();
    await entry('sent').first().waitFor();
    await page.fill('#sendData', '{"note":"direct over api"}');
    await page.click('#sendApi');
    // The API names the event type (default `message`, as seed 002 has it).
    await page.locator('#log .entry[data-dir="in"]').filter({ hasText: 'direct over api' }).first().waitFor();
    await page.locator('#sendResult.ok').waitFor();
  });

  await step('minting a dev token without a JWT secret shows the error', async () => {
    await page.click('#mintToken');
    const shown = page.locator('#connResult.err');
    await shown.waitFor();
    const text = await shown.textContent();
    if (!/\b40[49]\b/.test(text)) throw new Error(`unexpected mint result: ${text}`);
  });

  await step('the status panel shows at least one connection', async () => {
    await page.waitForFunction(
      () => Number(document.getElementById('statConnections').dataset.value) >= 1,
      null,
      { timeout: STEP_MS },
    );
    const rows = await page.locator('#shardRows tr').count();
    if (rows < 1) throw new Error('no per-shard rows');
    const err = await page.locator('#statusError').isVisible();
    if (err) throw new Error(`status error shown: ${await page.textContent('#statusError')}`);
  });

  await step('the filter narrows the log', async () => {
    await page.fill('#filter', 'websocket');
    await page.waitForFunction(() => {
      const shown = [...document.querySelectorAll('#log .entry')].filter((e) => !e.hidden);
      return shown.length >= 1 && shown.every((e) => e.textContent.toLowerCase().includes('websocket'));
    }, null, { timeout: STEP_MS });
    await page.fill('#filter', '');
  });

  await step('disconnect', async () => {
    await page.click('#disconnect');
    await page.waitForFunction(() => document.getElementById('state').dataset.state === 'closed', null, { timeout: STEP_MS });
    await page.locator('#log .entry[data-type="ws:close"]').first().waitFor();
  });

  if (pageErrors.length) {
    current = 'no script errors on the page';
    throw new Error(pageErrors.join('\n'));
  }
}

let failed = null;
try {
  await main();
} catch (e) {
  failed = e;
}
if (failed) {
  console.error(`FAIL ${current}: ${failed && failed.message ? failed.message : failed}`);
  if (page) {
    try {
      const state = await page.textContent('#state', { timeout: 1000 });
      console.error(`state: ${state}`);
      const entries = await page.$$eval('#log .entry', (es) => es.slice(0, 12).map((e) => e.textContent.replace(/\s+/g, ' ').slice(0, 300)));
      console.error('latest log entries (newest first):');
      for (const e of entries) console.error(`  ${e}`);
      const statusErr = await page.textContent('#statusError', { timeout: 1000 });
      if (statusErr) console.error(`status panel: ${statusErr}`);
    } catch {
      // the page is gone
    }
  }
  if (pageErrors.length) console.error(`page errors:\n  ${pageErrors.join('\n  ')}`);
  if (consoleLines.length) console.error(`browser console:\n  ${consoleLines.slice(-20).join('\n  ')}`);
}
if (browser) await browser.close().catch(() => {});
if (failed) {
  process.exit(1);
}
console.log('console browser test: all steps passed');
process.exit(0);
