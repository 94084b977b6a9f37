// The page's words (Chinese and English), built-in presets, example prompts and reply styles.

export const I18N = {
  zh: {
    newChat: "＋ 新对话", exportAll: "导出全部", importAll: "导入", lang: "English", untitled: "新对话",
    advanced: "高级设置", exportMd: "导出为 Markdown", clear: "清空对话", temperature: "温度", maxLength: "最大长度",
    apiKey: "API 密钥", prefix: "引导词：回答以此开头，例如“好的，”", prefixShort: "引导词",
    inputHint: "输入问题，Enter 发送，Shift/Ctrl+Enter 换行",
    send: "发送", stop: "停止", precise: "精确", default: "默认", creative: "创造", you: "你", bot: "ChatGLM2",
    edit: "编辑", save: "保存", cancel: "取消", regenerate: "重新生成", amend: "修改提问", revert: "撤回",
    rename: "重命名", duplicate: "复制对话", remove: "删除", more: "更多操作", deleted: "已删除对话", undo: "撤销",
    confirmClear: "清空这个对话的全部消息？", copy: "复制", copied: "已复制", imported: "已导入 {n} 个对话",
    importBad: "无法导入：文件不是有效的对话导出", storeBroken: "本地保存的数据已损坏，已备份并重新开始。",
    offline: "无法连接服务器：服务没有运行。请双击 开启API服务.bat（或运行 python -m server）启动它。",
    loading: "模型加载中，请稍候…",
    downloading: "正在下载模型：{p}", loadError: "模型加载失败：{m}",
    unavailable: "后端推理服务无响应（--backend）：{m}。恢复后会自动继续。", busy: "服务器忙：排队的请求已满，请稍后再试。",
    overflow: "问题太长：需要 {n} 个 token，最多 {l} 个（上下文 {c}）。请缩短问题或引导词。",
    genError: "生成出错：{m}", keyNeeded: "需要 API 密钥：请在 ⚙ 高级设置中填写。", badRequest: "请求有误：{m}",
    tokens: "上下文 {n} / {c} tokens", willDrop: "，最早的几轮对话将被省略", tooLong: "，问题太长，发送会被拒绝",
    dropped: "上一次回答时已被省略",
    live: "生成中… {r} tokens/s", finished: "完成：{f}，{n} tokens，{r} tokens/s",
    lost: "出错：连接中断，回答到此为止（已保存）", queued: "排队中，前面还有 {n} 个请求…", queuedNext: "排队中，下一个就轮到你…", thinking: "思考中…",
    stopReason: "自然结束", lengthReason: "达到长度上限", interruptedReason: "已停止", errorReason: "出错",
    otherBusy: "另一个对话正在生成回答；等它完成或停止后再发送。", newText: "↓ 新内容",
    presets: "预设角色", savePreset: "把这个对话存为预设", presetSaved: "已存为预设：{n}", removePreset: "删除预设",
    emptyTitle: "开始一个新对话", emptyModel: "模型 {m} · {d} · {p} · 上下文 {c} tokens", examples: "试试这些：",
    close: "关闭", conversations: "对话列表", loadImage: "加载图片",
    themeSystem: "主题：跟随系统", themeLight: "主题：浅色", themeDark: "主题：深色",
  },
  en: {
    newChat: "+ New chat", exportAll: "Export all", importAll: "Import", lang: "中文", untitled: "New chat",
    advanced: "Advanced", exportMd: "Export as Markdown", clear: "Clear chat", temperature: "Temperature",
    maxLength: "Max length", apiKey: "API key", prefix: "Answer prefix: the reply starts with it, e.g. \"Sure,\"",
    prefixShort: "Prefix", inputHint: "Ask something. Enter sends, Shift/Ctrl+Enter adds a line", send: "Send",
    stop: "Stop", precise: "Precise", default: "Default", creative: "Creative", you: "You", bot: "ChatGLM2",
    edit: "Edit", save: "Save", cancel: "Cancel", regenerate: "Regenerate", amend: "Amend", revert: "Revert",
    rename: "Rename", duplicate: "Duplicate", remove: "Delete", more: "More actions", deleted: "Chat deleted",
    undo: "Undo", confirmClear: "Delete every message of this chat?", copy: "Copy", copied: "Copied",
    imported: "Imported {n} chats", importBad: "Cannot import: not a chat export file",
    storeBroken: "The saved data was broken; it was backed up and a fresh start made.",
    offline: "Cannot reach the server: it is not running. Double-click 开启API服务.bat (or run python -m server).",
    loading: "The model is loading, please wait…",
    downloading: "Downloading the model: {p}", loadError: "The model failed to load: {m}",
    unavailable: "No backend engine answers (--backend): {m}. Chat resumes by itself once one does.",
    busy: "The server is busy: its queue is full. Try again in a moment.",
    overflow: "The question is too long: {n} tokens, at most {l} fit (context {c}). Shorten it or the prefix.",
    genError: "Generation failed: {m}", keyNeeded: "An API key is needed: enter it under ⚙ Advanced.",
    badRequest: "Bad request: {m}", tokens: "context {n} / {c} tokens", willDrop: ", the oldest rounds will be dropped",
    tooLong: ", the question is too long and would be refused", dropped: "left out of the last answer",
    live: "generating… {r} tokens/s", finished: "done: {f}, {n} tokens, {r} tokens/s",
    lost: "Error: the connection was lost; the reply ends here (saved)", queued: "Queued, {n} ahead…", queuedNext: "Queued, next in line…",
    thinking: "Thinking…", stopReason: "finished", lengthReason: "length limit reached",
    interruptedReason: "stopped", errorReason: "error",
    otherBusy: "Another chat is generating a reply; send when it has finished or been stopped.",
    newText: "↓ New text", presets: "Presets", savePreset: "Save this chat as a preset",
    presetSaved: "Saved as a preset: {n}", removePreset: "Delete preset", emptyTitle: "Start a new chat",
    emptyModel: "Model {m} · {d} · {p} · context {c} tokens", examples: "Try one of these:", close: "Close",
    conversations: "Conversations", loadImage: "Load image",
    themeSystem: "Theme: system", themeLight: "Theme: light", themeDark: "Theme: dark",
  },
};
// Built-in presets: a first exchange that sets a role (written for this project).
export const BUILTIN_PRESETS = [
  {id: "cat", name: {zh: "猫娘", en: "Cat girl"}, pairs: [
    {q: "从现在开始，你扮演一只可爱的猫娘，说话温柔，每句话结尾都加上“喵~”。明白了吗？",
     a: "明白了喵~ 主人今天想聊些什么呢喵~"}]},
  {id: "adventure", name: {zh: "文字冒险", en: "Text adventure"}, pairs: [
    {q: "我们来玩文字冒险游戏：你是主持人，每次描述场景，再给我三个编号的行动选项，我回复编号来行动。开始吧！",
     a: "你在一座古老森林的边缘醒来，身边有一个旧背包，远处隐约传来钟声。\n\n1. 走进森林深处\n" +
        "2. 沿着小路去寻找钟声\n3. 先打开背包看看"}]},
  {id: "translator", name: {zh: "翻译助手", en: "Translator"}, pairs: [
    {q: "接下来我发给你的每一段中文，都请翻译成自然地道的英文，只输出译文，不要解释。",
     a: "好的，请发送需要翻译的中文。"}]},
  {id: "tutor", name: {zh: "英语陪练", en: "English tutor"}, pairs: [
    {q: "Please be my English conversation partner. Reply in simple English, and after each reply point out one " +
        "mistake in my last message, if there is one.",
     a: "Sure! I'd love to practise with you. What would you like to talk about today?"}]},
];
export const EXAMPLES = {
  zh: ["用三句话介绍一下你自己", "写一首关于秋天的七言绝句", "用 Python 写一个快速排序，并解释它的思路"],
  en: ["Introduce yourself in three sentences", "Write a short poem about autumn",
       "Write quicksort in Python and explain how it works"],
};
export const STYLES = {precise: {top_p: 0.5, temperature: 0.6}, default: {top_p: 0.7, temperature: 1.0},
                creative: {top_p: 0.9, temperature: 1.4}};
export const THEMES = ["system", "light", "dark"];
