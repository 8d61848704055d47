// "Mark as undesired" on images shown by output and preview nodes: adds the image to a named
// forget set through the pack's route, the same store the Mark Undesired Output node loads.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const SETTING = "InstanceUnlearn.DefaultForgetSet";
const TITLE = "Mark as undesired";

// The image the node shows (the selected one of a batch), as the server's /view parameters.
function shownImage(node) {
  const images = node.imgs ?? [];
  if (!images.length) return null;
  const index = node.imageIndex ?? node.overIndex ?? 0;
  const element = images[Math.min(index, images.length - 1)];
  if (!element?.src) return null;
  const params = new URL(element.src, window.location.href).searchParams;
  const filename = params.get("filename");
  if (!filename) return null;
  return { filename, subfolder: params.get("subfolder") ?? "", type: params.get("type") ?? "output" };
}

async function askForgetSet() {
  const suggested = app.extensionManager.setting.get(SETTING) || "default";
  const answer = await app.extensionManager.dialog.prompt({
    title: TITLE,
    message: "Forget set to add this image to:",
    defaultValue: suggested,
  });
  return answer?.trim() || null;
}

function notify(severity, detail) {
  app.extensionManager.toast.add({ severity, summary: TITLE, detail, life: severity === "error" ? 8000 : 4000 });
}

async function mark(image) {
  const forgetSet = await askForgetSet();
  if (!forgetSet) return;
  let response;
  let result;
  try {
    response = await api.fetchApi("/unlearn/mark", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ forget_set: forgetSet, ...image }),
    });
    result = await response.json();
  } catch (error) {
    notify("error", `The server did not answer: ${error.message ?? error}`);
    return;
  }
  if (!response.ok) {
    notify("error", result?.error ?? `HTTP ${response.status}`);
    return;
  }
  notify(
    "success",
    result.added
      ? `Added to forget set "${result.forget_set}" (${result.count} targets).`
      : `Already in forget set "${result.forget_set}" (${result.count} targets).`,
  );
}

app.registerExtension({
  name: "unlearn.MarkUndesired",
  settings: [
    {
      id: SETTING,
      name: "Default forget set for 'Mark as undesired'",
      category: ["Instance Unlearn", "Forget sets", "Default forget set"],
      type: "text",
      defaultValue: "default",
      tooltip: "The forget set the image context menu suggests; the Mark Undesired Output node loads it by name.",
    },
  ],
  getNodeMenuItems(node) {
    const image = shownImage(node);
    if (!image) return [];
    return [null, { content: TITLE, callback: () => mark(image) }];
  },
});
