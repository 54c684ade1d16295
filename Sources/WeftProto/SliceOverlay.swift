/// Where the bytes of one stretch of a chunk come from.
public struct ChunkSegment: Equatable, Sendable {
    /// Offset of this stretch inside the chunk.
    public var offsetInChunk: UInt32
    public var length: UInt32
    /// Chunk object to read, or 0 for a hole (zeros).
    public var sliceID: SliceID
    /// Offset inside the chunk object.
    public var objectOffset: UInt32
    /// Stored length of the chunk object.
    public var objectLength: UInt32
    /// Hub holding the object (`Slice.hub`; 0 = the home).
    public var hub: UInt16 = 0
}

/// Resolves a chunk's slice list (oldest first; later slices cover earlier ones) into the
/// segments that make up `[start, end)` of the chunk, in order, with holes as `sliceID == 0`.
public func overlaySlices(_ slices: [Slice], start: UInt32, end: UInt32) -> [ChunkSegment] {
    guard end > start else { return [] }
    var segments = [ChunkSegment(offsetInChunk: start, length: end - start, sliceID: 0, objectOffset: 0, objectLength: 0)]
    for slice in slices where slice.length > 0 {
        let paintStart = max(start, slice.offsetInChunk)
        let paintEnd = min(end, slice.offsetInChunk + slice.length)
        guard paintStart < paintEnd else { continue }
        var painted: [ChunkSegment] = []
        painted.reserveCapacity(segments.count + 2)
        var inserted = false
        for segment in segments {
            let segmentEnd = segment.offsetInChunk + segment.length
            if segmentEnd <= paintStart || segment.offsetInChunk >= paintEnd {
                if !inserted && segment.offsetInChunk >= paintEnd {
                    painted.append(newSegment(slice, paintStart, paintEnd))
                    inserted = true
                }
                painted.append(segment)
                continue
            }
            if segment.offsetInChunk < paintStart {
                var head = segment
                head.length = paintStart - segment.offsetInChunk
                painted.append(head)
            }
            if !inserted {
                painted.append(newSegment(slice, paintStart, paintEnd))
                inserted = true
            }
            if segmentEnd > paintEnd {
                var tail = segment
                let cut = paintEnd - segment.offsetInChunk
                tail.offsetInChunk = paintEnd
                tail.length = segmentEnd - paintEnd
                if tail.sliceID != 0 { tail.objectOffset += cut }
                painted.append(tail)
            }
        }
        if !inserted { painted.append(newSegment(slice, paintStart, paintEnd)) }
        segments = painted
    }
    return segments
}

private func newSegment(_ slice: Slice, _ start: UInt32, _ end: UInt32) -> ChunkSegment {
    ChunkSegment(offsetInChunk: start, length: end - start, sliceID: slice.id,
                 objectOffset: slice.sliceOffset + (start - slice.offsetInChunk), objectLength: slice.objectLength,
                 hub: slice.hub)
}
