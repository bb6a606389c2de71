// The web console in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core), against a server that scripts/console-test.sh started and fed with real
// client traffic (traffic.py; what it did is in CONSOLE_SCENARIO). The tests share one page
// and run in order: the later ones change what the earlier ones looked at.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { chromium } from 'playwright-core';

const ADMIN = process.env.TRIBUTARY_ADMIN;
const TOKEN = process.env.TRIBUTARY_TOKEN;
const scenario = JSON.parse(readFileSync(process.env.CONSOLE_SCENARIO, 'utf8'));
const WAIT_MS = 20_000;

let browser;
let page;
const consoleErrors = [];

before(async () => {
  assert.ok(ADMIN && TOKEN, 'TRIBUTARY_ADMIN and TRIBUTARY_TOKEN are set by scripts/console-test.sh');
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM_BIN || '/usr/bin/chromium',
    // Root in a container has no user namespaces for Chromium's sandbox.
    args: ['--no-sandbox', '--disable-dev-shm-usage'],
  });
  page = await browser.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
  page.on('pageerror', (e) => consoleErrors.push(`page error: ${e.message}`));
});

after(async () => {
  await browser?.close();
});

async function open(name) {
  await page.goto(`${ADMIN}/#/${name}`);
  await page.waitForSelector(`main[data-page="${name}"]`);
}

// Waits until the element's trimmed text satisfies `want` (a string: equal; a RegExp: match).
async function waitText(selector, want) {
  try {
    await page.waitForFunction(([sel, source, flags, exact]) => {
      const el = document.querySelector(sel);
      if (!el) return false;
      const text = el.textContent.trim();
      return exact === null ? new RegExp(source, flags).test(text) : text === exact;
    }, [selector, want instanceof RegExp ? want.source : '', want instanceof RegExp ? want.flags : '',
      want instanceof RegExp ? null : String(want)], { timeout: WAIT_MS });
  } catch (e) {
    const now = await page.$eval(selector, (el) => el.textContent.trim()).catch(() => '(no such element)');
    assert.fail(`${selector}: wanted ${want}, shows ${now} (${e.message.split('\n')[0]})`);
  }
}

const q = (name) => `tr[data-queue="default/${name}"]`;

test('the overview loads without console errors and charts the rates', async () => {
  await open('overview');
  await waitText('[data-testid="count-streams"] .v', /^[1-9]/);
  await waitText('[data-testid="count-queues"] .v', /^[1-9]/);
  // A rate needs two polls: the chart draws a line from then on.
  // (Attached, not visible: at rest the rate is 0 and the line is flat.)
  await page.waitForSelector('[data-testid="chart-messages"] polyline', { state: 'attached' });
  await page.waitForSelector('[data-testid="chart-bytes"] polyline', { state: 'attached' });
  // Live: MQTT messages published while the page polls show as a rate above zero.
  const [cmd, ...args] = process.env.CONSOLE_BURST.split(' ');
  const burst = spawn(cmd, args, { stdio: 'inherit' });
  const exited = new Promise((resolve) => burst.on('exit', resolve));
  try {
    await waitText('[data-testid="chart-messages"] .legend span', /^in: [1-9]/);
  } finally {
    assert.equal(await exited, 0, 'the MQTT burst failed');
  }
  // Each protocol the traffic used has its row, with the messages clients sent.
  for (const protocol of ['kafka', 'mqtt', 'amqp']) {
    await waitText(`[data-testid="protocols"] tr[data-protocol="${protocol}"] td.messages-in`, /^[1-9]/);
  }
  const listeners = await page.$$('[data-testid="listeners"] tbody tr');
  assert.ok(listeners.length >= 3, `one row per protocol listener, got ${listeners.length}`);
  assert.deepEqual(consoleErrors, []);
});

test('streams show the topic the Kafka producer wrote', async () => {
  await open('streams');
  const row = `tr[data-stream="default/${scenario.kafka.topic}"][data-partition="0"]`;
  await waitText(`${row} td.end-offset`, String(scenario.kafka.end_offset));
});

test('consumer groups show the committed offset and the lag', async () => {
  await open('groups');
  const row = `tr[data-group="default/${scenario.kafka.group}"]`;
  await waitText(`${row} td.lag`, String(scenario.kafka.lag));
  const cells = await page.$$eval(`${row} td`, (tds) => tds.map((td) => td.textContent.trim()));
  assert.ok(cells.includes(String(scenario.kafka.committed)), cells.join(' | '));
});

test('MQTT sessions show the subscription and the queued messages', async () => {
  await open('sessions');
  const row = `tr[data-client="${scenario.mqtt.client_id}"]`;
  await waitText(`${row} td.queued`, String(scenario.mqtt.queued));
  await waitText(`${row} td.subscriptions`, new RegExp(scenario.mqtt.filter.replace(/[/#]/g, '\\$&')));
});

test('exchanges show the dead-letter exchange and its binding', async () => {
  await open('exchanges');
  await waitText(`tr[data-exchange="default/${scenario.amqp.exchange}"] td.bindings`,
    new RegExp(scenario.amqp.dead_letter_queue));
});

test('queues show depth and dead letters, and browsing shows the dead letter', async () => {
  await open('queues');
  const { queue, dead_letter_queue: dlq } = scenario.amqp;
  await waitText(`${q(queue)} td.ready`, String(scenario.amqp.ready));
  await waitText(`${q(queue)} td.dead-letters`, '1');
  await waitText(`${q(dlq)} td.ready`, '1');
  await page.click(`${q(dlq)} button[data-action="browse"]`);
  await waitText('[data-testid="messages"] tbody', new RegExp(scenario.amqp.dead_letter_body));
  // Browsing consumed nothing.
  await waitText(`${q(dlq)} td.ready`, '1');
  await waitText(`${q(dlq)} td.leased`, '0');
  assert.deepEqual(consoleErrors, [], 'no console errors while reading');
});

test('a write without the token is refused', async () => {
  const status = await page.evaluate(async (queue) => {
    const res = await fetch(`/api/v1/queues/default/${queue}/purge`, { method: 'POST' });
    return res.status;
  }, scenario.amqp.queue);
  assert.equal(status, 401);
  await waitText(`${q(scenario.amqp.queue)} td.ready`, String(scenario.amqp.ready));
});

test('the redrive button moves the dead letter back (asking for the token)', async () => {
  const { queue, dead_letter_queue: dlq } = scenario.amqp;
  await page.click(`${q(dlq)} button[data-action="redrive"]`);
  // No token in this tab yet: the server answers 401 and the console asks for one.
  await page.waitForSelector('#token-form:not([hidden])');
  await page.fill('#token-input', TOKEN);
  await page.click('#token-form button[type="submit"]');
  await waitText('#banner', /Redrive of console-dlq started/);
  await waitText(`${q(queue)} td.ready`, String(scenario.amqp.ready + 1));
  await waitText(`${q(dlq)} td.ready`, '0');
  await waitText('[data-testid="redrives"] td.status', 'COMPLETED');
});

test('the purge button empties the queue', async () => {
  const { queue } = scenario.amqp;
  page.once('dialog', (d) => d.accept());
  await page.click(`${q(queue)} button[data-action="purge"]`);
  await waitText('#banner', new RegExp(`Purged ${scenario.amqp.ready + 1} message`));
  await waitText(`${q(queue)} td.ready`, '0');
});

test('the connections page shows a live AMQP connection, and Close ends it with 320', async () => {
  const [cmd, ...args] = process.env.CONSOLE_HOLD.split(' ');
  const held = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  held.stdout.on('data', (d) => { out += d; });
  const exited = new Promise((resolve) => held.on('exit', resolve));
  try {
    await open('connections');
    const row = 'tr[data-client="console-held"]';
    await waitText(`${row} td.client`, 'console-held');
    // The tab has the token since the redrive test: Close goes straight through.
    page.once('dialog', (d) => d.accept());
    await page.click(`${row} button[data-action="close"]`);
    await waitText('#banner', /^Closed connection \d+ \(console-held\)\.$/);
    await page.waitForSelector(row, { state: 'detached' });
    assert.equal(await exited, 0, `the held connection was not closed by the server: ${out}`);
    assert.match(out, /closed by the broker: 320 CONNECTION_FORCED/);
  } finally {
    if (held.exitCode === null) held.kill();
  }
});

test('the users page loads, and no console errors beyond the refused write', async () => {
  await open('users');
  await page.waitForSelector('[data-testid="users"]');
  const unexpected = consoleErrors.filter((e) => !/401/.test(e));
  assert.deepEqual(unexpected, []);
});
