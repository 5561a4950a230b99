// Checks UI message stream parts against the `ai` package's own schema of them (uiMessageChunkSchema):
// reads a JSON array of parts on stdin, prints a JSON array of the ones it refuses, with the reason.
import { uiMessageChunkSchema } from "ai";

const schema = uiMessageChunkSchema();
let input = "";
for await (const chunk of process.stdin) input += chunk;
const refused = [];
for (const part of JSON.parse(input)) {
  const result = await schema.validate(part);
  if (!result.success) refused.push({ part, error: String(result.error) });
}
process.stdout.write(JSON.stringify(refused));
