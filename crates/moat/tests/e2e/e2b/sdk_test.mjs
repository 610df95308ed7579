// Drive moat's E2B front with the unmodified official `e2b` JavaScript SDK: the core flow.
//
//     node sdk_test.mjs TEMPLATE
//
// Run from a directory whose node_modules holds `e2b`; the SDK reads E2B_API_URL,
// E2B_SANDBOX_URL and E2B_API_KEY (what `eval "$(moat e2b env)"` exports). Every step asserts
// and prints its duration; the first surprise ends the script with a non-zero exit. The sandbox
// is killed on the way out, even when a check failed.

import assert from 'node:assert/strict'
import { createRequire } from 'node:module'

import { CommandExitError, FileType, NotFoundError, Sandbox } from 'e2b'

const template = process.argv[2]
assert.ok(template, 'usage: node sdk_test.mjs TEMPLATE')
for (const name of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  assert.ok(process.env[name], `${name} is not set: run eval "$(moat e2b env)" first`)
}
const sdk = createRequire(import.meta.url)('e2b/package.json').version
console.log(`e2b (JavaScript) ${sdk}, node ${process.version}; API ${process.env.E2B_API_URL}`)

async function step(name, body) {
  console.log(`--- ${name}`)
  const start = performance.now()
  await body()
  console.log(`    ok in ${Math.round(performance.now() - start)} ms`)
}

const home = '/home/user'
let sandbox
try {
  await step('Sandbox.create(template, { timeoutMs, metadata, envs })', async () => {
    sandbox = await Sandbox.create(template, {
      timeoutMs: 300_000,
      metadata: { suite: 'javascript' },
      envs: { FROM_CREATE: 'js-env' },
    })
    console.log(`    sandbox ${sandbox.sandboxId}`)
    assert.equal(await sandbox.isRunning(), true)
    const info = await sandbox.getInfo()
    assert.equal(info.sandboxId, sandbox.sandboxId)
    assert.deepEqual(info.metadata, { suite: 'javascript' })
    assert.equal(info.state, 'running')
  })

  await step('commands.run: output, callbacks, exit codes, envs, cwd, user', async () => {
    const chunks = []
    const r = await sandbox.commands.run('echo out; echo err >&2; echo $FROM_CREATE', {
      onStdout: (d) => chunks.push(d),
    })
    assert.equal(r.stdout, 'out\njs-env\n')
    assert.equal(r.stderr, 'err\n')
    assert.equal(r.exitCode, 0)
    assert.equal(chunks.join(''), 'out\njs-env\n')
    await assert.rejects(sandbox.commands.run('echo partial; exit 3'), (e) => {
      assert.ok(e instanceof CommandExitError, `${e}`)
      assert.equal(e.exitCode, 3)
      assert.equal(e.stdout, 'partial\n')
      return true
    })
    const env = await sandbox.commands.run('echo "$A $(pwd) $(id -u)"', { envs: { A: 'a' }, cwd: '/tmp' })
    assert.equal(env.stdout, 'a /tmp 1000\n')
    assert.equal((await sandbox.commands.run('id -u', { user: 'root' })).stdout, '0\n')
    const bg = await sandbox.commands.run('sleep 1; echo later', { background: true })
    assert.equal((await bg.wait()).stdout, 'later\n')
  })

  await step('files: write, read, list, exists, remove', async () => {
    const info = await sandbox.files.write(`${home}/js/hello.txt`, 'hello from js\n')
    assert.equal(info.path, `${home}/js/hello.txt`)
    assert.equal(await sandbox.files.read(`${home}/js/hello.txt`), 'hello from js\n')
    const bytes = new Uint8Array(70_000).map((_, i) => (i * 7) % 256)
    await sandbox.files.write(`${home}/js/bytes.bin`, bytes.buffer)
    const back = await sandbox.files.read(`${home}/js/bytes.bin`, { format: 'bytes' })
    assert.deepEqual(Buffer.from(back), Buffer.from(bytes))
    await sandbox.files.write([
      { path: `${home}/js/a.txt`, data: 'A' },
      { path: `${home}/js/b.txt`, data: 'B' },
    ])
    const listed = await sandbox.files.list(`${home}/js`)
    assert.deepEqual(listed.map((e) => e.name).sort(), ['a.txt', 'b.txt', 'bytes.bin', 'hello.txt'])
    assert.ok(listed.every((e) => e.type === FileType.FILE), JSON.stringify(listed))
    assert.equal(await sandbox.files.exists(`${home}/js/a.txt`), true)
    await sandbox.files.remove(`${home}/js/a.txt`)
    assert.equal(await sandbox.files.exists(`${home}/js/a.txt`), false)
    await assert.rejects(sandbox.files.read(`${home}/js/a.txt`), NotFoundError)
  })

  await step('kill', async () => {
    assert.equal(await sandbox.kill(), true)
    assert.equal(await sandbox.isRunning(), false)
    assert.equal(await Sandbox.kill(sandbox.sandboxId), false)
    sandbox = undefined
  })
} finally {
  if (sandbox) {
    await sandbox.kill().catch((e) => console.log(`cleanup: killing ${sandbox.sandboxId} failed: ${e}`))
  }
}
console.log('ok')
